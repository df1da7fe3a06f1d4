"""Files shipped with the package: the bundled default model."""
from __future__ import annotations

from pathlib import Path

from ..errors import GLMError

ASSETS = Path(__file__).parent


def demo_model_dir() -> Path:
    """The bundled model ``glmrt generate`` uses when no model is given."""
    d = ASSETS / "demo"
    if not (d / "config.json").is_file():
        raise GLMError("the bundled demo model is missing (rebuild it with scripts/make_demo_model.py)", d)
    return d
