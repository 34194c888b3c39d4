"""The sliding-window engine: window grid, blending, fused stitching, post-processing."""
