"""Parallelism core: bootstrap, topology, tensor / pipeline / data parallelism.

Identical on every backend: collectives are torch.distributed's, and the distributed
backend name comes from the selected glm backend (``Backend.dist_backend``). See
docs/parallel.md for the design and docs/scaling.md for measured start-up figures.

The names below are resolved on first use (PEP 562), as the package root's are:
``glmrt launch``'s per-rank supervisor reads its rank through
:mod:`glm_runtime.parallel.launchenv` and must not pay for the torch import the other
modules need.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "DistributedError": "launchenv", "discover": "launchenv", "fail_fast": "bootstrap", "init": "bootstrap",
    "shutdown": "bootstrap", "timeout_for": "bootstrap", "PipelineTrainer": "pipeline", "bubble_theory": "pipeline",
    "partition_layers": "stages", "Topology": "topology",
}
__all__ = ["DistributedError", "PipelineTrainer", "Topology", "bubble_theory", "discover", "fail_fast", "init",
           "partition_layers", "shutdown", "timeout_for"]  # = the keys of _PUBLIC

if TYPE_CHECKING:
    from .bootstrap import fail_fast, init, shutdown, timeout_for
    from .launchenv import DistributedError, discover
    from .pipeline import PipelineTrainer, bubble_theory
    from .stages import partition_layers
    from .topology import Topology


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'glm_runtime.parallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value
