"""The conformance suite collected by ``pytest --glm-backend NAME``."""
