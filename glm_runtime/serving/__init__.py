"""Serving: the engine (many requests decoded together; usable from Python) and, above it,
the OpenAI-compatible HTTP server and the terminal chat (docs/serving.md)."""
