"""Training code for DTML: data pipeline, losses, loops."""
