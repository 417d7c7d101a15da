"""Tasks beyond language modelling: text classification (docs/classification.md)."""
