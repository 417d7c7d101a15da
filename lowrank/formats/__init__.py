"""Model and adapter directories in every format lowrank reads or writes: its own checkpoints, Hugging Face, PEFT."""
