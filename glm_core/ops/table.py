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
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import BackendError
from .contract import OPS, Kernel

log = logging.getLogger("glm_runtime.core.ops")
_warned: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class OpPlacement:
    op: str
    provider: str  # backend name, or "reference"
    note: str


def strict_from_env() -> bool:
    return os.environ.get("GLM_STRICT_OPS", "").lower() in ("1", "true", "yes")


class OpTable:
    """Attribute access gives the resolved callable: ``ops.attention(q, k, v, ...)``.

    One field per op of the contract, typed with the op's signature (the reference
    functions in :mod:`~glm_runtime.core.ops.reference` document each argument), so type
    checkers and editors see ``ops.attention``; a test keeps these fields and
    :data:`~glm_runtime.core.ops.contract.OPS` the same set.
    """

    embedding: Callable[[Tensor, Tensor], Tensor]                          # (ids, weight)
    linear: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]            # (x, weight, bias)
    lm_head: Callable[[Tensor, Tensor], Tensor]                            # (x, weight)
    quantized_linear: Callable[[Tensor, Tensor, Tensor, Optional[Tensor], int], Tensor]
    #                    (x, qweight, scale, bias, bits)
    layer_norm: Callable[[Tensor, Tensor, Optional[Tensor], float], Tensor]  # (x, weight, bias, eps)
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]                    # (x, weight, eps)
    rotary: Callable[[Tensor, Tensor, Tensor, str], Tensor]                # (x, cos, sin, layout)
    attention: Callable[[Tensor, Tensor, Tensor, Optional[Tensor], float, Optional[float], float], Tensor]
    #                    (q, k, v, mask, scale, mask_value, layer_scale)
    glu: Callable[[Tensor, str], Tensor]                                   # (u, activation)
    gelu_tanh: Callable[[Tensor], Tensor]                                  # (x)
    cross_entropy: Callable[[Tensor, Tensor], Tensor]                      # (logits, targets)

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
