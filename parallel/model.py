"""One rank's part of a GLM model under TP x PP: its pipeline stage, tensor-parallel.

:class:`ParallelModel` is built around a plain :class:`glm_core.model.GLMModel`: the
layers of the rank's stage are the graph's own :class:`Block` modules with their linears
swapped for TP versions (:mod:`parallel.tensor`); the embedding and output projection
become vocab-parallel. Its ``forward`` has the signature of ``GLMModel.forward`` and
returns full logits on every rank, so :func:`glm_core.generation.generate` runs on it
unchanged (:meth:`ParallelModel.new_cache` holds the rank's heads of the stage's layers).
Between pipeline stages the hidden state travels by point-to-point sends
(inference) or through torch's pipelining schedules (training, :mod:`parallel.pipeline`).

Parameter names are the native ones (``embed.weight``, ``layers.{i}.…``,
``final_norm.…``); the output projection is ``head.weight`` (``lm_head.weight`` in the
checkpoint; with tied embeddings it is the embedding on a single stage and a copy on the
last stage otherwise, whose gradient :meth:`finalize_grads` sums with the first stage's).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from glm_core.kv_cache import KVCache
from glm_core.model import GLMModel

from . import tensor as tpar
from .pipeline import partition_layers
from .topology import Topology


class ParallelModel(nn.Module):
    """This rank's pipeline stage of a GLM model, tensor-parallel (see the module docstring)."""

    def __init__(self, model: GLMModel, topo: Topology, ends_lighter: bool = False, backend=None):
        super().__init__()
        c = model.config
        self.global_config, self.topo, self.ops = c, topo, model.ops
        tp, r = topo.tp, topo.tp_rank
        group = topo.tp_group if tp > 1 else None
        self.tp_group = group
        tpar.check_divisible(c, tp)
        prepare = backend.prepare_parameter if backend is not None else (lambda name, t: t)
        # generation sizes its KV cache from .config: the per-rank heads
        self.config = tpar.local_config(c, tp)
        self.bounds = partition_layers(c.num_layers, topo.pp, ends_lighter)
        lo, hi = self.bounds[topo.pp_rank]
        self.layer_ids = list(range(lo, hi))
        self.first, self.last = topo.is_first_stage, topo.is_last_stage
        w = model.embed.weight
        # as GLMModel.dtype/.device, also on stages that hold no embedding (built in place, never moved)
        self.dtype, self.device = model.dtype, model.device
        self.vocab_start = r * (tpar.padded_vocab(c.vocab_size, tp) // tp)
        embed_w = tpar.shard("embed.weight", w.data, c, tp, r)
        if self.first:
            self.embed = tpar.VocabParallelEmbedding(model.ops, embed_w, self.vocab_start, group)
        self.layers = nn.ModuleDict()
        for i in self.layer_ids:
            block = model.layers[i]
            if tp > 1:
                tpar.parallelize_block(block, f"layers.{i}", c, tp, r, group, prepare)
            self.layers[str(i)] = block
        if self.last:
            self.final_norm = model.final_norm
            if c.tie_word_embeddings and self.first:
                head_w = self.embed.weight
            else:
                key = "embed.weight" if c.tie_word_embeddings else "lm_head.weight"
                src = w if c.tie_word_embeddings else model.lm_head.weight
                head_w = nn.Parameter(prepare("lm_head.weight", tpar.shard(key, src.data, c, tp, r)),
                                      requires_grad=False)
            self.head = tpar.VocabParallelHead(model.ops, head_w, self.vocab_start, c.vocab_size, group)
        self.rotary = model.rotary

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for this stage's layers and this rank's KV heads (see GLMModel.new_cache)."""
        return KVCache.for_config(self.config, batch, max_len, self.dtype, self.device, layers=self.layer_ids)

    def stage_forward(self, x, position_ids, mask, cache=None, start: int = 0, last_only: bool = False,
                      gather: bool = True):
        """This stage's part of ``GLMModel.forward``: ids (first stage) or hidden in, hidden
        (or logits on the last stage) out. Mirrors GLMModel.forward step for step."""
        if self.first:
            x = self.embed(x)
        cos, sin = self.rotary(position_ids, x.dtype)
        for block in self.layers.values():
            x = block(x, cos, sin, mask, cache, start)
        if not self.last:
            return x
        if last_only:
            x = x[:, -1:]
        return self.head(self.final_norm(x), gather=gather)

    def forward(self, input_ids, position_ids, mask, cache=None, start: int = 0, last_only: bool = False,
                gather: bool = True):
        """Full logits [B, T, V] (or [B, 1, V]) on every rank, as ``GLMModel.forward``.

        With one stage, ``gather=False`` returns this rank's vocabulary slice instead (for
        :meth:`loss`; data-parallel wrappers call this forward)."""
        if self.topo.pp == 1:
            return self.stage_forward(input_ids, position_ids, mask, cache, start, last_only, gather)
        B, T = input_ids.shape
        H = self.global_config.hidden_size
        dtype, dev = self.dtype, input_ids.device
        t = self.topo
        if self.first:
            x = input_ids
        else:
            x = torch.empty(B, T, H, dtype=dtype, device=dev)
            dist.recv(x, src=t.stage_rank(t.pp_rank - 1))
        y = self.stage_forward(x, position_ids, mask, cache, start, last_only)
        if not self.last:
            dist.send(y.contiguous(), dst=t.stage_rank(t.pp_rank + 1))
            Tout = 1 if last_only else T
            y = torch.empty(B, Tout, self.global_config.vocab_size, dtype=dtype, device=dev)
        y = y.contiguous()  # the vocabulary cut of padded logits is a strided view
        dist.broadcast(y, src=t.stage_rank(t.pp - 1), group=t.pp_group)
        return y

    # ----------------------------------------------------------------- training
    def loss(self, logits_local: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean token cross-entropy of this rank's vocabulary slice (vocab-parallel)."""
        return tpar.vocab_parallel_cross_entropy(logits_local, targets, self.vocab_start, self.tp_group,
                                                 ignore_index)

    def finalize_grads(self) -> None:
        """After backward: sum the gradients of replicated KV groups over TP, and of a tied
        embedding between the first and last stage."""
        t, c = self.topo, self.global_config
        tpar.reduce_replicated_kv_grads([self.layers[str(i)] for i in self.layer_ids], c, t.tp, t.tp_rank,
                                        self.tp_group)
        if c.tie_word_embeddings and t.pp > 1 and (self.first or self.last):
            p = self.embed.weight if self.first else self.head.weight
            # collectives need contiguous memory; the head copy may have the backend's
            # (transposed) layout, and so its gradient
            g = torch.zeros(p.shape, dtype=p.dtype, device=p.device) if p.grad is None else p.grad.contiguous()
            dist.all_reduce(g, group=t.embedding_group)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    # ------------------------------------------------------------------- state
    def native_items(self, grads: bool = False):
        """(native key, local tensor) pairs of this rank (gradient instead of value when
        ``grads``); the tied copy on the last stage is left out."""
        c = self.global_config
        for name, p in self.named_parameters():
            key = name
            if name == "head.weight":
                if c.tie_word_embeddings:
                    continue
                key = "lm_head.weight"
            t = p.grad if grads else p.data
            if t is None:
                t = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            if hasattr(t, "full_tensor"):  # sharded by FSDP2 over DP: a collective of the DP group
                t = t.full_tensor()
            yield key, t.detach()

    def gather_full(self, grads: bool = False, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """Full (unsharded) parameters or gradients of the whole model on rank ``dst``
        (gathered from the first data-parallel replica)."""
        t, c = self.topo, self.global_config
        mine = dict(self.native_items(grads))  # every rank: FSDP2 unsharding is collective
        if t.dp_rank != 0:
            mine = {}
        everything = [None] * t.world_size if t.rank == dst else None
        dist.gather_object((t.tp_rank, mine), everything, dst=dst)
        if t.rank != dst:
            return None
        by_key: dict[str, dict[int, torch.Tensor]] = {}
        for tp_rank, items in everything:
            for k, v in items.items():
                by_key.setdefault(k, {})[tp_rank] = v
        return {k: tpar.unshard(k, [pieces[i] for i in range(t.tp)], c, t.tp) for k, pieces in by_key.items()}
