"""glm-runtime core: the backend-neutral GLM graph, its op contract, backend registry,
generation and the Python API."""
from .api import GLM, load_model
from .config import GLMConfig
from .errors import BackendError, CheckpointError, GLMError
from .presets import PRESETS, preset

__all__ = ["GLM", "GLMConfig", "GLMError", "BackendError", "CheckpointError", "PRESETS", "load_model", "preset"]
__version__ = "0.1.0"
