"""Tensor-parallel split rules: which part of each checkpoint tensor a TP rank holds.

The single definition of every split, used wherever a tensor is cut for, or put back
together from, tensor-parallel ranks: the TP modules (:mod:`glm_runtime.parallel.tensor`),
training's resharding between layouts, and the GLM-130B SAT converter (whose per-rank
files follow the same layout). Pure tensor functions: no process groups.

Megatron's scheme: the fused QKV and the first MLP projection are split by output rows
(column-parallel), the attention output and the second MLP projection by input columns
(row-parallel), the embedding and output projection by vocabulary rows, padded to a
multiple of the TP degree. Head splitting follows the checkpoint layouts of every family
(see :func:`qkv_rows`):

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


def qkv_rows(config: GLMConfig, tp: int, r: int) -> torch.Tensor:
    """Rows of the fused QKV projection that rank r holds, in its local layout."""
    c, d = config, config.head_dim
    hl = c.num_heads // tp
    if c.qkv_layout == "per_head":
        return torch.arange(r * hl * 3 * d, (r + 1) * hl * 3 * d)
    q = torch.arange(r * hl * d, (r + 1) * hl * d)
    groups = kv_groups_of(c, tp, r)
    k = torch.cat([torch.arange(c.q_size + j * d, c.q_size + (j + 1) * d) for j in groups])
    v = k + c.kv_size
    return torch.cat((q, k, v))


def fc1_rows(config: GLMConfig, tp: int, r: int) -> torch.Tensor:
    f = config.ffn_hidden_size
    fl = f // tp
    a = torch.arange(r * fl, (r + 1) * fl)
    return torch.cat((a, a + f)) if config.gated else a


def split_kind(key: str, full: torch.Tensor | None = None):
    """(how, dim) for a native key: how in {vocab, qkv, fc1, cols, replicated}. A row-parallel
    linear's scales are replicated when per output row and split like its columns when
    block-wise (2-D; ``full`` tells which)."""
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
    if p in ("weight", "qweight") or (p == "scale" and full is not None and full.dim() == 2):
        return "cols", 1
    return "replicated", None


def _index(how: str, config: GLMConfig, tp: int, r: int, full_len: int) -> torch.Tensor:
    if how == "qkv":
        return qkv_rows(config, tp, r)
    if how == "fc1":
        return fc1_rows(config, tp, r)
    n = full_len // tp
    return torch.arange(r * n, (r + 1) * n)


def shard(key: str, full: torch.Tensor, config: GLMConfig, tp: int, r: int) -> torch.Tensor:
    """Rank r's part of the full tensor ``key`` (a native checkpoint key)."""
    how, dim = split_kind(key, full)
    if how == "replicated" or tp == 1:
        return full
    if how == "vocab":
        vp = padded_vocab(full.shape[0], tp)
        if vp != full.shape[0]:
            full = torch.cat((full, full.new_zeros(vp - full.shape[0], *full.shape[1:])))
        n = vp // tp
        return full[r * n:(r + 1) * n].clone()
    return full.index_select(dim, _index(how, config, tp, r, full.shape[dim])).clone()


def unshard(key: str, pieces: list[torch.Tensor], config: GLMConfig, tp: int) -> torch.Tensor:
    """Inverse of :func:`shard` from every rank's piece (replicated KV groups: rank order wins,
    copies are equal)."""
    how, dim = split_kind(key, pieces[0])
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
        full[_index(how, config, tp, r, rows)] = p
    return full
