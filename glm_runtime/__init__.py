"""glm-runtime: a hardware-portable runtime for the GLM family of language models.

The one import root. Its subpackages are the layers of the design, lowest first::

    glm_runtime.core        (folder glm_core/)    config, graph, op contract, registry, masks,
                                                   KV cache, generation, tokenizer, quantization
    glm_runtime.converters  (folder converters/)  checkpoint formats           -> core
    glm_runtime.parallel    (folder parallel/)    TP / PP / DP, bootstrap      -> core
    glm_runtime.backends    (folder backends/)    in-tree backend plugins      -> core, converters
    glm_runtime.api, .cli, .training, .conformance (folder glm_runtime/)  -> everything below

An import only ever points down this list (tests/test_layers.py checks it).

The stable public API, importable from here::

    from glm_runtime import load_model, GLM, GLMConfig, preset, PRESETS   # running models
    from glm_runtime import Backend, Capabilities, Probe, Check, Kernel, hookimpl  # writing a backend
    from glm_runtime import GLMError, CheckpointError, BackendError

Backends register under the entry-point group ``glm_runtime.backends`` (docs/porting.md).

The names are resolved on first use (PEP 562): importing any ``glm_runtime.*`` module
imports this package first, and the pytest plugin of the conformance kit, which pytest
loads in every session of an environment where glm-runtime is installed, must not pay for
torch there.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "glm_runtime.api", "GLM": "glm_runtime.api",
    "GLMConfig": "glm_runtime.core.config", "PRESETS": "glm_runtime.core.presets", "preset": "glm_runtime.core.presets",
    "GLMError": "glm_runtime.core.errors", "CheckpointError": "glm_runtime.core.errors",
    "BackendError": "glm_runtime.core.errors",
    "Backend": "glm_runtime.core.registry", "Capabilities": "glm_runtime.core.registry",
    "Probe": "glm_runtime.core.registry", "Check": "glm_runtime.core.registry", "hookimpl": "glm_runtime.core.registry",
    "Kernel": "glm_runtime.core.ops",
}
__all__ = ["GLM", "Backend", "BackendError", "Capabilities", "Check", "CheckpointError", "GLMConfig", "GLMError",
           "Kernel", "PRESETS", "Probe", "hookimpl", "load_model", "preset"]  # = the keys of _PUBLIC

if TYPE_CHECKING:
    from glm_runtime.api import GLM, load_model
    from glm_runtime.core.config import GLMConfig
    from glm_runtime.core.errors import BackendError, CheckpointError, GLMError
    from glm_runtime.core.ops import Kernel
    from glm_runtime.core.presets import PRESETS, preset
    from glm_runtime.core.registry import Backend, Capabilities, Check, Probe, hookimpl


def disable_torch_device_autoload() -> None:
    """Keep torch from importing device extensions (torch-npu) by itself: without Ascend's
    CANN installed, that auto-import breaks ``import torch``. The npu backend imports
    torch-npu explicitly when it is selected. Call before torch is imported; an explicit
    setting by the user wins."""
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'glm_runtime' has no attribute {name!r}")
    disable_torch_device_autoload()
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
