"""The onnx backend: exported GLM graphs run by onnxruntime (CPU, or any installed
execution provider), behind the same Python API and CLI as the torch backends."""
