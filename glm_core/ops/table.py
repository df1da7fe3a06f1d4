"""OpTable: the ops a model actually calls, resolved once for one backend and dtype.

Resolution is per op: the backend's kernel if it has one for the compute dtype, else the
reference. A fallback is never silent: it is warned about once per (backend, op, dtype),
listed in the op report (``glmrt backends --ops``, ``model.op_report()``), and in strict
mode (``--strict-ops`` / ``GLM_STRICT_OPS=1``, used in CI) it is an error.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..errors import BackendError
from .contract import OPS, Kernel

log = logging.getLogger("glm_core.ops")
_warned: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class OpPlacement:
    op: str
    provider: str  # backend name, or "reference"
    note: str


def strict_from_env() -> bool:
    return os.environ.get("GLM_STRICT_OPS", "").lower() in ("1", "true", "yes")


class OpTable:
    """Attribute access gives the resolved callable: ``ops.attention(q, k, v, ...)``."""

    def __init__(self, backend_name: str, kernels: dict[str, Kernel], dtype: torch.dtype,
                 strict: bool | None = None, required: tuple[str, ...] | None = None):
        strict = strict_from_env() if strict is None else strict
        self.backend_name = backend_name
        self.dtype = dtype
        self.placements: list[OpPlacement] = []
        unknown = sorted(set(kernels) - set(OPS))
        if unknown:
            raise BackendError(f"backend {backend_name!r} registers unknown op(s): {', '.join(unknown)}")
        fallbacks = []
        for name, spec in OPS.items():
            k = kernels.get(name)
            if k is not None and k.supports(dtype):
                fn, placement = k.fn, OpPlacement(name, backend_name, k.note)
            else:
                why = ("no kernel" if k is None else f"kernel does not support {dtype}")
                fn, placement = spec.reference, OpPlacement(name, "reference", why)
                if required is None or name in required:
                    fallbacks.append((name, why))
            setattr(self, name, fn)
            self.placements.append(placement)
        if fallbacks and backend_name != "reference":
            msg = ", ".join(f"{n} ({w})" for n, w in fallbacks)
            if strict:
                raise BackendError(f"strict ops: backend {backend_name!r} falls back to the reference for "
                                   f"{msg}")
            for n, w in fallbacks:
                key = (backend_name, n, str(dtype))
                if key not in _warned:
                    _warned.add(key)
                    log.warning("backend %r has no %s kernel for %s (%s): using the reference", backend_name,
                                n, dtype, w)

    def report(self) -> list[OpPlacement]:
        return list(self.placements)

    def format_report(self) -> str:
        w = max(len(p.op) for p in self.placements)
        lines = [f"op table for backend {self.backend_name!r}, compute dtype {str(self.dtype).replace('torch.', '')}"]
        for p in self.placements:
            lines.append(f"  {p.op:<{w}}  {p.provider:<10}  {p.note}")
        return "\n".join(lines)
