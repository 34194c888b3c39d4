"""dtml: Dual-Task Mutual Learning for 3D segmentation, from training to fast inference."""

__version__ = "0.1.0"
