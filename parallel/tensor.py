"""Tensor parallelism written with plain torch.distributed collectives (any backend).

Megatron's scheme, applied around the plain graph: the fused QKV and the first MLP
projection are column-parallel (each rank computes some heads / some FFN columns, no
communication forward, all-reduce of the input gradient backward); the attention output
and the second MLP projection are row-parallel (local partial products, all-reduce
forward, bias added once after it). The embedding and output projection are split over
the vocabulary, padded to a multiple of the TP degree; padded columns are masked out of
the logits and of the vocab-parallel cross-entropy.

Head splitting follows the checkpoint layouts of every family (see :func:`qkv_rows`):

* per-head interleaved ``[q_h; k_h; v_h]`` (GLM-130B, ChatGLM-6B): a contiguous block of
  whole heads per rank;
* blocked ``[Q | K | V]`` (ChatGLM2/3, GLM-4): the rank's query heads from Q and the KV
  groups they use from K and V. With fewer KV groups than TP ranks each group is
  replicated on the ``tp / groups`` ranks whose query heads use it; the gradients of the
  copies are summed over the TP group by :func:`reduce_replicated_kv_grads`.

The gated first MLP projection ``[A | G]`` is split per half, rank r holding
``[A_r; G_r]`` (GLM-130B's ``convert_tp.py`` layout), so the gated activation stays local.

:func:`shard` and :func:`unshard` are the single definition of every split; the module
surgery and the gathering of full parameters or gradients both use them.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from glm_core.config import GLMConfig
from glm_core.errors import GLMError
from glm_core.model import Block

# --------------------------------------------------------------------- collectives


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel op)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward; identity backward (output of a row-parallel op)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.width = x.shape[-1]
        return torch.cat(parts, -1)

    @staticmethod
    def backward(ctx, g):
        r = dist.get_rank(ctx.group)
        return g[..., r * ctx.width:(r + 1) * ctx.width].contiguous(), None


def copy_to_group(x, group):
    return x if group is None else _CopyToGroup.apply(x, group)


def reduce_from_group(x, group):
    return x if group is None else _ReduceFromGroup.apply(x, group)


def gather_last_dim(x, group):
    return x if group is None else _GatherLastDim.apply(x, group)


# ------------------------------------------------------------------------ sharding


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


def _split(key: str):
    """(how, dim) for a native key: how in {vocab, qkv, fc1, cols, replicated}."""
    if key in ("embed.weight", "lm_head.weight"):
        return "vocab", 0
    m = re.search(r"\.(attn\.qkv|attn\.dense|mlp\.fc1|mlp\.fc2)\.(weight|qweight|bias|scale)$", key)
    if not m:
        return "replicated", None
    mod, p = m.groups()
    if mod == "attn.qkv":
        return "qkv", 0
    if mod == "mlp.fc1":
        return "fc1", 0
    return ("cols", 1) if p in ("weight", "qweight") else ("replicated", None)


def _index(how: str, config: GLMConfig, tp: int, r: int, full_len: int) -> torch.Tensor:
    if how == "qkv":
        return qkv_rows(config, tp, r)
    if how == "fc1":
        return fc1_rows(config, tp, r)
    n = full_len // tp
    return torch.arange(r * n, (r + 1) * n)


def shard(key: str, full: torch.Tensor, config: GLMConfig, tp: int, r: int) -> torch.Tensor:
    """Rank r's part of the full tensor ``key`` (a native checkpoint key)."""
    how, dim = _split(key)
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
    how, dim = _split(key)
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


# ------------------------------------------------------------------------- modules


class ParallelLinear(nn.Module):
    """Column- or row-parallel version of a (quantized) linear of the graph.

    It owns the same parameter and buffer names as the module it replaces (``weight`` or
    ``qweight``/``scale``, ``bias``), so state-dict keys stay the native ones, and calls the
    backend's op table for the local product.
    """

    def __init__(self, base: nn.Module, kind: str, group, tensors: dict[str, torch.Tensor]):
        super().__init__()
        if kind not in ("column", "row"):
            raise ValueError(kind)
        self.ops, self.kind, self.group = base.ops, kind, group
        self.bits = getattr(base, "bits", None)
        self.bias = None
        for name, t in tensors.items():
            if t is None:
                continue
            if t.is_floating_point() and name != "scale":
                setattr(self, name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t)

    def _local(self, x, bias):
        if self.bits:
            return self.ops.quantized_linear(x, self.qweight, self.scale, bias, self.bits)
        return self.ops.linear(x, self.weight, bias)

    def forward(self, x):
        if self.kind == "column":
            return self._local(copy_to_group(x, self.group), self.bias)
        y = reduce_from_group(self._local(x, None), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows ``[start, start + n)`` of the padded vocabulary; other ids give zeros
    here and their rows come from the all-reduce."""

    def __init__(self, ops, weight: torch.Tensor, start: int, group):
        super().__init__()
        self.ops, self.start, self.group = ops, start, group
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids):
        if self.group is None:
            return self.ops.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        e = self.ops.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_group(e.masked_fill(outside[..., None], 0), self.group)


class VocabParallelHead(nn.Module):
    """Output projection over this rank's vocabulary slice.

    ``forward(x, gather=True)`` gives full logits [.., V]; ``gather=False`` gives the local
    slice with padded columns set to the most negative float (for the vocab-parallel
    cross-entropy, which never materialises full logits).
    """

    def __init__(self, ops, weight: nn.Parameter, start: int, vocab_size: int, group):
        super().__init__()
        self.ops, self.start, self.vocab_size, self.group = ops, start, vocab_size, group
        self.weight = weight
        self.valid = max(0, min(weight.shape[0], vocab_size - start))

    def forward(self, x, gather: bool = True):
        logits = self.ops.lm_head(copy_to_group(x, self.group), self.weight)
        if self.valid < logits.shape[-1]:
            pad = torch.arange(logits.shape[-1], device=logits.device) >= self.valid
            logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        if not gather:
            return logits
        return gather_last_dim(logits, self.group)[..., :self.vocab_size]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy: three all-reduces of [N] vectors, no full logits."""

    @staticmethod
    def forward(ctx, logits, targets, start, group, ignore_index):
        z = logits.float()
        m = z.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m[:, None]
        n_local = z.shape[-1]
        valid = targets != ignore_index
        lt = targets - start
        inside = (lt >= 0) & (lt < n_local) & valid
        lt = lt.clamp(0, n_local - 1)
        tgt = z.gather(1, lt[:, None]).squeeze(1) * inside
        dist.all_reduce(tgt, group=group)
        e = z.exp()
        s = e.sum(-1)
        dist.all_reduce(s, group=group)
        count = valid.sum().clamp(min=1)
        loss = ((s.log() - tgt) * valid).sum() / count
        ctx.save_for_backward(e / s[:, None], lt, inside, valid, count)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        probs, lt, inside, valid, count = ctx.saved_tensors
        grad = probs.clone()
        grad[torch.arange(len(lt)), lt] -= inside.to(grad.dtype)
        grad *= (valid.to(grad.dtype) * g / count)[:, None]
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, start: int, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy of local-vocabulary logits [.., V/tp] (fp32 compute)."""
    flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if group is None:
        return torch.nn.functional.cross_entropy(flat.float(), t, ignore_index=ignore_index)
    return _VocabParallelCrossEntropy.apply(flat, t, start, group, ignore_index)


# ------------------------------------------------------------------------ surgery


def _tensors(mod: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.data for n, p in mod.named_parameters(recurse=False)}
    out.update({n: b for n, b in mod.named_buffers(recurse=False)})
    if "bias" not in out:
        out["bias"] = None
    return out


def parallelize_block(block: Block, prefix: str, config: GLMConfig, tp: int, r: int, group,
                      prepare=None) -> None:
    """Replace the four linears of one layer by their TP versions, in place. ``prepare``
    (the backend's ``prepare_parameter``) gives each shard the backend's memory layout."""
    check_divisible(config, tp)
    prepare = prepare or (lambda name, t: t)
    for path, kind in (("attn.qkv", "column"), ("attn.dense", "row"), ("mlp.fc1", "column"),
                       ("mlp.fc2", "row")):
        parent_name, child = path.split(".")
        parent = getattr(block, parent_name)
        base = getattr(parent, child)
        parts = {n: None if t is None else prepare(f"{prefix}.{path}.{n}",
                                                    shard(f"{prefix}.{path}.{n}", t, config, tp, r))
                 for n, t in _tensors(base).items()}
        setattr(parent, child, ParallelLinear(base, kind, group, parts))
    block.attn.config = local_config(config, tp)


def reduce_replicated_kv_grads(layers, config: GLMConfig, tp: int, tp_rank: int, group) -> None:
    """Sum the gradients of KV-group copies over the ranks that hold them.

    With fewer KV groups than TP ranks, rank r's copy of group j only sees the gradient
    from r's own query heads; the full gradient of group j is the sum over its copies.
    One all-reduce per layer over the TP group: each rank puts its K and V rows in group
    j's slot of a zero buffer, the sum lands in every slot, and each copy takes its slot
    back (``tp / groups`` copies of a slot add up exactly the contributions of all heads).
    """
    g, d = config.num_kv_heads, config.head_dim
    if g >= tp or group is None:
        return
    j = kv_groups_of(config, tp, tp_rank)[0]
    q_local = config.num_heads // tp * d
    for layer in layers:
        qkv = layer.attn.qkv
        for p in (qkv.weight, qkv.bias):
            if p is None or p.grad is None:
                continue
            kv = p.grad[q_local:]  # [2 d (, H)]: K rows then V rows of the single local group
            buf = kv.new_zeros(g, *kv.shape)
            buf[j] = kv
            dist.all_reduce(buf, group=group)
            p.grad[q_local:] = buf[j]
