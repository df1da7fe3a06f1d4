"""Tensor parallelism written with plain torch.distributed collectives (any backend).

Megatron's scheme, applied around the plain graph: the fused QKV and the first MLP
projection are column-parallel (each rank computes some heads / some FFN columns, no
communication forward, all-reduce of the input gradient backward); the attention output
and the second MLP projection are row-parallel (local partial products, all-reduce
forward, bias added once after it). The embedding and output projection are split over
the vocabulary, padded to a multiple of the TP degree; padded columns are masked out of
the logits and of the vocab-parallel cross-entropy.

Which rows and columns each rank holds is :mod:`glm_runtime.core.sharding` (the single
definition of every split); with fewer KV groups than TP ranks, the gradients of a
replicated group's copies are summed over the TP group by
:func:`reduce_replicated_kv_grads`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.model import Block, Embedding, Head, QuantizedLinear
from glm_runtime.core.quant import keeps_stored_dtype
from glm_runtime.core.sharding import check_divisible, kv_groups_of, local_config, shard

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
            if keeps_stored_dtype(name, t):  # quantized weights and their scales are buffers
                self.register_buffer(name, t)
            else:
                setattr(self, name, nn.Parameter(t, requires_grad=False))

    def _local(self, x, bias):
        if self.bits:
            return self.ops.quantized_linear(x, self.qweight, self.scale, bias, self.bits)
        return self.ops.linear(x, self.weight, bias)

    def forward(self, x):
        if self.kind == "column":
            return self._local(copy_to_group(x, self.group), self.bias)
        y = reduce_from_group(self._local(x, None), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(Embedding):
    """Embedding rows ``[start, start + n)`` of the padded vocabulary; other ids give zeros
    here and their rows come from the all-reduce."""

    def __init__(self, ops, weight: torch.Tensor, start: int, group):
        nn.Module.__init__(self)  # the weight is the given shard, not a new [V, H] matrix
        self.ops, self.start, self.group = ops, start, group
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids):
        if self.group is None:
            return self.ops.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        e = self.ops.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_group(e.masked_fill(outside[..., None], 0), self.group)


def _hide_padding(logits: torch.Tensor, valid: int) -> torch.Tensor:
    """Set the padded vocabulary columns (beyond ``valid``) to the most negative float."""
    if valid < logits.shape[-1]:
        pad = torch.arange(logits.shape[-1], device=logits.device) >= valid
        logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
    return logits


class VocabParallelHead(Head):
    """Output projection over this rank's vocabulary slice: logits [.., V_padded / tp] with
    the padded columns set to the most negative float. The slices are gathered into full
    logits by :class:`~glm_runtime.parallel.model.ParallelModel`; the vocab-parallel
    cross-entropy reads the slices as they are and never materialises full logits."""

    def __init__(self, ops, start: int, vocab_size: int, group, weight: nn.Parameter | None = None,
                 tied: Embedding | None = None):
        super().__init__(ops, weight=weight, tied=tied)
        self.start, self.vocab_size, self.group = start, vocab_size, group
        self.valid = max(0, min(self.matrix.shape[0], vocab_size - start))

    def forward(self, x):
        return _hide_padding(self.ops.lm_head(copy_to_group(x, self.group), self.matrix), self.valid)


class VocabParallelQuantizedHead(QuantizedLinear):
    """:class:`VocabParallelHead` of a quantized output projection (``lm_head_bits``): this
    rank's rows of ``lm_head.qweight`` / ``lm_head.scale``."""

    def __init__(self, ops, qweight: torch.Tensor, scale: torch.Tensor, bits: int, start: int, vocab_size: int,
                 group):
        nn.Module.__init__(self)  # the buffers are the given shards, not new [V, H] ones
        self.ops, self.bits, self.bias = ops, bits, None
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.start, self.vocab_size, self.group = start, vocab_size, group
        self.valid = max(0, min(qweight.shape[0], vocab_size - start))

    def forward(self, x):
        return _hide_padding(super().forward(copy_to_group(x, self.group)), self.valid)


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
