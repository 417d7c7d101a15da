"""The training loop and the checks around each update."""
