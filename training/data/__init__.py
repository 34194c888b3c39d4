"""Training data: case sources, caching, sampling, augmentation and targets."""
