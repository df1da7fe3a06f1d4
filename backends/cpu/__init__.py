"""The CPU backend: the reference backend, fp32 compute."""
