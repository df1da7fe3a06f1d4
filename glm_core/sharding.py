"""Tensor-parallel split rules: which part of each checkpoint tensor a TP rank holds.

The single definition of every split, used wherever a tensor is cut for, or put back
together from, tensor-parallel ranks: the TP modules (:mod:`glm_runtime.parallel.tensor`),
training's resharding between layouts, and the GLM-130B SAT converter (whose per-rank
files follow the same layout). Pure tensor functions: no process groups.

Megatron's scheme: the fused QKV and the first MLP projection are split by output rows
(column-parallel), the attention output and the second MLP projection by input columns
(row-parallel), the embedding and output projection by vocabulary rows, padded to a
multiple of the TP degree. Head splitting follows the checkpoint layouts of every family
(see :func:`qkv_ranges`):

* per-head interleaved ``[q_h; k_h; v_h]`` (GLM-130B, ChatGLM-6B): a contiguous block of
  whole heads per rank;
* blocked ``[Q | K | V]`` (ChatGLM2/3, GLM-4): the rank's query heads from Q and the KV
  groups they use from K and V. With fewer KV groups than TP ranks each group is
  replicated on the ``tp / groups`` ranks whose query heads use it.

The gated first MLP projection ``[A | G]`` is split per half, rank r holding
``[A_r; G_r]`` (GLM-130B's ``convert_tp.py`` layout), so the gated activation stays local.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .config import GLMConfig
from .errors import GLMError


def check_divisible(config: GLMConfig, tp: int) -> None:
    """Raise a clear error when ``config`` cannot be split ``tp`` ways."""
    c = config
    problems = []
    if c.num_heads % tp:
        problems.append(f"num_heads={c.num_heads} is not a multiple of tp={tp}")
    g = c.num_kv_heads
    if g >= tp and g % tp:
        problems.append(f"num_kv_heads={g} is not a multiple of tp={tp}")
    if g < tp and tp % g:
        problems.append(f"tp={tp} is not a multiple of num_kv_heads={g} (KV groups are replicated)")
    if c.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={c.ffn_hidden_size} is not a multiple of tp={tp}")
    if c.quantization_bits == 4 and (c.ffn_hidden_size // tp) % 2 or c.quantization_bits == 4 and \
            (c.q_size // tp) % 2:
        problems.append("INT4 row-parallel slices must have an even width")
    block = c.quantization_block
    if block and ((c.ffn_hidden_size // tp) % block or (c.q_size // tp) % block):
        problems.append(f"row-parallel slices must hold whole quantization blocks of {block} columns")
    if problems:
        raise GLMError(f"cannot split this model {tp} ways: " + "; ".join(problems))


def local_config(config: GLMConfig, tp: int) -> GLMConfig:
    """The per-rank view of the attention: its heads and KV groups (vocab and depth unchanged)."""
    g = config.num_kv_heads
    return config.replace(num_heads=config.num_heads // tp, num_kv_heads=g // tp if g >= tp else 1)


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def kv_groups_of(config: GLMConfig, tp: int, r: int) -> list[int]:
    g = config.num_kv_heads
    if g >= tp:
        return list(range(r * g // tp, (r + 1) * g // tp))
    return [r // (tp // g)]


def qkv_ranges(config: GLMConfig, tp: int, r: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the fused QKV projection that rank r holds, in the order
    of its local layout (its query heads, then the K and V rows of the KV groups they use)."""
    c, d = config, config.head_dim
    hl = c.num_heads // tp
    if c.qkv_layout == "per_head":
        return [(r * hl * 3 * d, (r + 1) * hl * 3 * d)]
    groups = kv_groups_of(c, tp, r)  # consecutive
    k = (c.q_size + groups[0] * d, c.q_size + (groups[-1] + 1) * d)
    return [(r * hl * d, (r + 1) * hl * d), k, (k[0] + c.kv_size, k[1] + c.kv_size)]


def fc1_ranges(config: GLMConfig, tp: int, r: int) -> list[tuple[int, int]]:
    f = config.ffn_hidden_size
    fl = f // tp
    a = (r * fl, (r + 1) * fl)
    return [a, (a[0] + f, a[1] + f)] if config.gated else [a]


def _rows(ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges])


def split_kind(key: str, ndim: int | None = None):
    """(how, dim) for a native key: how in {vocab, qkv, fc1, cols, replicated}. A row-parallel
    linear's scales are replicated when per output row and split like its columns when
    block-wise (2-D; ``ndim``, the tensor's number of dimensions, tells which)."""
    if key in ("embed.weight", "lm_head.weight", "lm_head.qweight", "lm_head.scale"):
        return "vocab", 0
    m = re.search(r"\.(attn\.qkv|attn\.dense|mlp\.fc1|mlp\.fc2)\.(weight|qweight|bias|scale)$", key)
    if not m:
        return "replicated", None
    mod, p = m.groups()
    if mod == "attn.qkv":
        return "qkv", 0
    if mod == "mlp.fc1":
        return "fc1", 0
    if p in ("weight", "qweight") or (p == "scale" and ndim == 2):
        return "cols", 1
    return "replicated", None


def ranges(how: str, config: GLMConfig, tp: int, r: int, full_len: int) -> list[tuple[int, int]]:
    """The index ranges [start, stop) along the split dimension that rank r holds of a
    tensor split ``how`` whose split dimension has ``full_len`` entries (the padded
    vocabulary's rows for ``vocab``: rows beyond ``full_len`` are zero padding)."""
    if how == "qkv":
        return qkv_ranges(config, tp, r)
    if how == "fc1":
        return fc1_ranges(config, tp, r)
    n = (padded_vocab(full_len, tp) if how == "vocab" else full_len) // tp
    return [(r * n, (r + 1) * n)]


Read = Callable[[int | None, int | None, int | None], torch.Tensor]
"""``read(dim, start, stop)``: entries [start, stop) of a stored tensor along ``dim``;
``read(None, None, None)``: the whole tensor."""


def local_part(key: str, shape: tuple[int, ...], config: GLMConfig, tp: int, r: int, read: Read) -> torch.Tensor:
    """Rank r's part of the tensor ``key`` (a native checkpoint key) of ``shape``, read
    through ``read`` one contiguous range at a time: from a whole tensor in memory
    (:func:`shard`) or straight from a file, so that a rank never holds more than its part.
    Every split of the project is this function."""
    how, dim = split_kind(key, len(shape))
    if how == "replicated" or tp == 1:
        return read(None, None, None)
    parts = []
    for a, b in ranges(how, config, tp, r, shape[dim]):
        stored = min(b, shape[dim])
        if stored > a:
            parts.append(read(dim, a, stored))
        if b > max(a, stored):  # vocabulary padding rows
            pad = list(shape)
            pad[dim] = b - max(a, stored)
            parts.append((parts[0] if parts else read(dim, 0, 0)).new_zeros(pad))
    return parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim)


def shard(key: str, full: torch.Tensor, config: GLMConfig, tp: int, r: int) -> torch.Tensor:
    """Rank r's part of the full tensor ``key`` (a native checkpoint key)."""
    if tp == 1 or split_kind(key, full.dim())[0] == "replicated":
        return full
    return local_part(key, tuple(full.shape), config, tp, r, lambda dim, a, b: full.narrow(dim, a, b - a))


def unshard(key: str, pieces: list[torch.Tensor], config: GLMConfig, tp: int) -> torch.Tensor:
    """Inverse of :func:`shard` from every rank's piece (replicated KV groups: rank order wins,
    copies are equal)."""
    how, dim = split_kind(key, pieces[0].dim())
    if how == "replicated" or tp == 1:
        return pieces[0]
    if how == "vocab":
        return torch.cat(pieces)[:config.vocab_size]
    if how == "cols":
        return torch.cat(pieces, dim)
    rows = {"qkv": config.q_size + 2 * config.kv_size,
            "fc1": config.ffn_hidden_size * (2 if config.gated else 1)}[how]
    full = pieces[0].new_empty(rows, *pieces[0].shape[1:])
    for r, p in enumerate(pieces):
        full[_rows(ranges(how, config, tp, r, rows))] = p
    return full
