"""Values a kernel derives from its input tensors once and reuses: the one cache of them.

A backend kernel often wants an input in another form than the graph holds it: a
quantized weight repacked for the platform's low-bit GEMM, the tile map of a mask. Building
that form on every call would cost what the kernel saves, so it is built once and kept
*on the tensor it came from*: it lives exactly as long as that tensor (no global table to
clear, no id reuse after a tensor is freed), and it is rebuilt when that tensor or another
input it depends on is modified in place (its version counter moves).

Inference tensors (made under ``torch.inference_mode``) have no version counter: what is
derived from one is reused for as long as it lives. Derive only from inputs that are not
rewritten in place while alive (loaded weights; a mask built for one forward), never from a
buffer a decode loop overwrites step after step.
"""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

T = TypeVar("T")
_ATTR = "_glm_derived"


def _stamp(t: torch.Tensor):
    return id(t), t.data_ptr(), None if t.is_inference() else t._version


def derived(source: torch.Tensor, tag: Hashable, build: Callable[[], T], depends: tuple[torch.Tensor, ...] = ()) -> T:
    """``build()``, computed once per (``source``, ``tag``) and rebuilt only when ``source``
    or one of ``depends`` (the other tensors ``build`` reads) has changed."""
    stamp = (_stamp(source), *(_stamp(t) for t in depends))
    table = getattr(source, _ATTR, None)
    if table is None:
        table = {}
        setattr(source, _ATTR, table)
    hit = table.get(tag)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = build()
    table[tag] = (stamp, value)
    return value
