"""Preallocated key/value cache, written in place.

One buffer per layer for keys and one for values, ``[rows, g, max_len, d]``, allocated
once (per generation call, or once for a serving engine's slots): a step writes its new
keys and values into the buffers and attends to a view of them, so no step allocates or
concatenates. Buffers are keyed by the global layer id and a cache holds only the layers
it is given: a pipeline stage allocates its own layers, not the whole model's.

Where a step writes: at one position shared by its rows (``start`` an int: a prefill, or
decoding a batch whose rows advance together), or at each row's own position (``start`` a
LongTensor [B], one new token per row: sequences of different lengths decoding together).
What it attends to: the first ``kv_len`` positions of its rows, ``kv_len`` being the
width of the step's attention mask; positions a row has not written yet are masked out.
A fixed ``kv_len`` (the whole buffer) gives every decode step the same shapes.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class KVCache:
    def __init__(self, layers: Iterable[int], rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (rows, kv_heads, max_len, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in self.k}
        self.rows, self.max_len = rows, max_len
        self._row_ids = torch.arange(rows, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    def view(self, rows: slice) -> "KVCache":
        """The same buffers seen through some of their rows (a slot of a serving engine):
        writes through the view land in this cache."""
        out = KVCache.__new__(KVCache)
        out.k = {i: t[rows] for i, t in self.k.items()}
        out.v = {i: t[rows] for i, t in self.v.items()}
        out.rows, out.max_len = next(iter(out.k.values())).shape[0] if out.k else 0, self.max_len
        out._row_ids = self._row_ids[:out.rows]
        return out

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, kv_len: int):
        """Write k, v [B, g, T, d] for rows 0..B-1 at ``start`` (module docstring) and return
        views of their first ``kv_len`` positions."""
        kb, vb = self.k[layer], self.v[layer]
        B, T = k.shape[0], k.shape[2]
        if isinstance(start, int):
            if start + T > self.max_len:
                raise ValueError(f"KV cache of {self.max_len} positions is full (need {start + T})")
            kb[:B, :, start:start + T] = k
            vb[:B, :, start:start + T] = v
        else:  # one token per row, each at its own position
            rows = self._row_ids[:B]
            kb[rows, :, start] = k[:, :, 0]
            vb[rows, :, start] = v[:, :, 0]
        return kb[:B, :, :kv_len], vb[:B, :, :kv_len]
