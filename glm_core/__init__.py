"""The backend-neutral core (``glm_runtime.core``): configuration and presets, the one GLM
graph, the op contract, the backend registry, masks and positions, the KV cache,
generation, tokenizers, chat prompts and the quantization scheme.

It imports nothing from the layers above it (converters, parallel, backends, the
application); ``glm_runtime.load_model`` puts them together.
"""
