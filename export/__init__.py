"""Export a model bundle to deployable artifacts (ONNX, TensorRT) and verify them against PyTorch."""
