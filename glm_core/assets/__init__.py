"""Files shipped with the package: the bundled default model."""
from __future__ import annotations

from pathlib import Path

from ..errors import GLMError

ASSETS = Path(__file__).parent


def default_model_dir() -> Path:
    """The bundled model ``glmrt generate`` uses when no model is given: ``glm-tiny``, a
    2.9M-parameter GLM-130B-style model trained by ``glmrt train configs/glm-tiny.yaml``
    (see docs/training.md)."""
    d = ASSETS / "glm-tiny"
    if not (d / "config.json").is_file():
        raise GLMError("the bundled model is missing (retrain it with: glmrt train configs/glm-tiny.yaml)", d)
    return d
