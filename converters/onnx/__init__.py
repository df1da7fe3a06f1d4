"""ONNX: export GLM checkpoints to onnxruntime-ready graphs with the KV cache as inputs and
outputs (:mod:`.export`), their on-disk layout and checks (:mod:`.layout`), and the INT8
variant (:mod:`.quantize`). The runtime side is the ``onnx`` backend (``backends/onnx``)."""
