"""The small neural core: Parameter/Module, the plain Linear, AdamW and schedules' building blocks, step hooks, the SVD split, config field checks."""
