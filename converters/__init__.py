"""Converters between the world's GLM checkpoint formats and the native format.

``detect.load_checkpoint(path)`` reads any supported directory into (GLMConfig, native
state dict); ``native.save`` writes the native format atomically; each foreign format
has its own module with a reader (and a writer where the format allows it).
"""
