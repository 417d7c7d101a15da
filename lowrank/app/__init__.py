"""Front ends: the command line, the workflows it runs, run directories, demos, benchmarks."""
