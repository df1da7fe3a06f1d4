"""Preallocated key/value cache.

One contiguous buffer per layer for keys and one for values, ``[B, g, max_len, d]``,
allocated once per generation call: decoding writes one slice per step and attends to a
view of the filled prefix, so no step allocates or concatenates. Buffers are keyed by the
global layer id and a cache holds only the layers it is given: a pipeline stage allocates
its own layers, not the whole model's.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class KVCache:
    def __init__(self, layers: Iterable[int], batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in self.k}
        self.max_len = max_len

    @classmethod
    def for_config(cls, config, batch: int, max_len: int, dtype: torch.dtype, device="cpu",
                   layers: Iterable[int] | None = None) -> "KVCache":
        """A cache for ``layers`` (default: all of ``config``'s) with ``config``'s KV heads."""
        layers = range(config.num_layers) if layers is None else layers
        return cls(layers, batch, config.num_kv_heads, max_len, config.head_dim, dtype, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write k, v [B, g, T, d] at ``start`` and return views of positions 0..start+T."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full (need {end})")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
