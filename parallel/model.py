"""One rank's part of a GLM model under TP x PP: its pipeline stage, tensor-parallel.

:class:`ParallelModel` *is* a :class:`~glm_runtime.core.model.GLMModel`, with the same
forward and the same parameter names (the native checkpoint keys), made from a whole model
torchtitan-style (a meta skeleton when the rank reads only its parts of a checkpoint,
:meth:`assign_parts`): the other stages' layers are removed (layers stay keyed by their global
id), the embedding goes on every stage but the first and the final norm and head on
every stage but the last, and each linear, the embedding and the head is swapped for its
tensor-parallel version (:mod:`glm_runtime.parallel.tensor`). A stage's own forward is
therefore ``GLMModel.forward``: ids (first stage) or hidden states in, hidden states or
this rank's slice of the vocabulary out.

:meth:`ParallelModel.forward` adds what crosses ranks: hidden states between stages by
point-to-point sends (inference; training runs torch's pipelining schedules over
:meth:`stage_forward`, :mod:`glm_runtime.parallel.pipeline`) and the vocabulary slices
gathered into full logits on every rank, so :func:`glm_runtime.core.generation.generate`
runs on it unchanged (:meth:`new_cache` holds the rank's heads of the stage's layers).

With tied embeddings the head reads the embedding's matrix on a single stage, and holds a
copy on the last stage otherwise (``lm_head.weight``, left out of checkpoints), whose
gradient :meth:`finalize_grads` sums with the first stage's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from glm_runtime.core import sharding
from glm_runtime.core.build import assign
from glm_runtime.core.model import GLMModel, Layers

from . import tensor as tpar
from .stages import partition_layers
from .topology import Topology


class ParallelModel(GLMModel):
    """This rank's pipeline stage of a GLM model, tensor-parallel (see the module docstring)."""

    def __init__(self, model: GLMModel, topo: Topology, ends_lighter: bool = False, backend=None):
        nn.Module.__init__(self)  # adopts ``model``'s modules below instead of building new ones
        c = model.config
        self.config, self.ops, self.topo = c, model.ops, topo
        tp, r = topo.tp, topo.tp_rank
        group = topo.tp_group if tp > 1 else None
        self.tp_group = group
        sharding.check_divisible(c, tp)
        prepare = backend.prepare_parameter if backend is not None else (lambda name, t: t)
        self.bounds = partition_layers(c.num_layers, topo.pp, ends_lighter)
        lo, hi = self.bounds[topo.pp_rank]
        self.first, self.last = topo.is_first_stage, topo.is_last_stage
        self.vocab_start = r * (sharding.padded_vocab(c.vocab_size, tp) // tp)

        full_embed = model.embed.weight.data
        self.embed = (tpar.VocabParallelEmbedding(model.ops, sharding.shard("embed.weight", full_embed, c, tp, r),
                                                  self.vocab_start, group) if self.first else None)
        self.layers = Layers()
        for i in range(lo, hi):
            block = model.layers[i]
            if tp > 1:
                tpar.parallelize_block(block, f"layers.{i}", c, tp, r, group, prepare)
            self.layers[i] = block
        self.final_norm = model.final_norm if self.last else None
        self.lm_head = None
        if self.last:
            head = dict(start=self.vocab_start, vocab_size=c.vocab_size, group=group)
            if c.lm_head_bits:
                q, s = (sharding.shard(f"lm_head.{n}", getattr(model.lm_head, n), c, tp, r) for n in ("qweight", "scale"))
                self.lm_head = tpar.VocabParallelQuantizedHead(model.ops, q, s, c.lm_head_bits, **head)
            elif c.tie_word_embeddings and self.first:
                self.lm_head = tpar.VocabParallelHead(model.ops, tied=self.embed, **head)
            else:  # the untied head, or the last stage's copy of a tied embedding
                key = "embed.weight" if c.tie_word_embeddings else "lm_head.weight"
                full = full_embed if c.tie_word_embeddings else model.lm_head.weight.data
                w = nn.Parameter(prepare("lm_head.weight", sharding.shard(key, full, c, tp, r)), requires_grad=False)
                self.lm_head = tpar.VocabParallelHead(model.ops, weight=w, **head)
        self.rotary = model.rotary
        # as GLMModel.dtype/.device, also on stages without an embedding (built in place, never moved)
        self._dtype, self._device = model.dtype, model.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ loading
    def checkpoint_keys(self) -> dict[str, str]:
        """This rank's state-dict names, each with the checkpoint key its part is cut from
        (the last stage's copy of a tied embedding is cut from ``embed.weight``)."""
        tied = self.config.tie_word_embeddings
        return {name: "embed.weight" if tied and name == "lm_head.weight" else name
                for name in self.state_dict(keep_vars=True)}

    def assign_parts(self, parts: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                     prepare=None) -> ParallelModel:
        """Fill a rank built from a meta skeleton with its parts of the weights (keyed as
        :meth:`checkpoint_keys`), so that no rank ever holds the whole model."""
        assign(self, parts, dtype, device, prepare)
        self._dtype, self._device = dtype, device
        return self

    # ------------------------------------------------------------------ forward
    def stage_forward(self, x, position_ids, mask, cache=None, start: int = 0, logits_index=None):
        """This stage alone: :meth:`GLMModel.forward` (hidden states, or this rank's
        vocabulary slice of the logits on the last stage)."""
        return GLMModel.forward(self, x, position_ids, mask, cache, start, logits_index)

    def forward(self, input_ids, position_ids, mask, cache=None, start: int = 0, logits_index=None,
                gather: bool = True):
        """Full logits [B, T, V] (or the positions ``logits_index``) on every rank, as
        ``GLMModel.forward``.

        With one stage, ``gather=False`` returns this rank's vocabulary slice instead (for
        :meth:`loss`; data-parallel wrappers call this forward)."""
        t = self.topo
        if t.pp == 1:
            y = self.stage_forward(input_ids, position_ids, mask, cache, start, logits_index)
            return self._gather(y) if gather else y
        B, T = input_ids.shape
        H = self.config.hidden_size
        dtype, dev = self.dtype, input_ids.device
        if self.first:
            x = input_ids
        else:
            x = torch.empty(B, T, H, dtype=dtype, device=dev)
            dist.recv(x, src=t.stage_rank(t.pp_rank - 1))
        y = self.stage_forward(x, position_ids, mask, cache, start, logits_index)
        if self.last:
            y = self._gather(y)
        else:
            dist.send(y.contiguous(), dst=t.stage_rank(t.pp_rank + 1))
            Tout = T if logits_index is None else len(logits_index)
            y = torch.empty(B, Tout, self.config.vocab_size, dtype=dtype, device=dev)
        y = y.contiguous()  # the vocabulary cut of padded logits is a strided view
        dist.broadcast(y, src=t.stage_rank(t.pp - 1), group=t.pp_group)
        return y

    def _gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice -> full logits (the padded columns cut off)."""
        return tpar.gather_last_dim(local_logits, self.tp_group)[..., :self.config.vocab_size]

    # ----------------------------------------------------------------- training
    def loss(self, logits_local: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean token cross-entropy of this rank's vocabulary slice (vocab-parallel)."""
        return tpar.vocab_parallel_cross_entropy(logits_local, targets, self.vocab_start, self.tp_group,
                                                 ignore_index)

    def finalize_grads(self) -> None:
        """After backward: sum the gradients of replicated KV groups over TP, and of a tied
        embedding between the first and last stage."""
        t, c = self.topo, self.config
        tpar.reduce_replicated_kv_grads(list(self.layers.values()), c, t.tp, t.tp_rank, self.tp_group)
        if c.tie_word_embeddings and t.pp > 1 and (self.first or self.last):
            p = self.embed.weight if self.first else self.lm_head.weight
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
        ``grads``); the last stage's copy of a tied embedding is left out."""
        tied_copy = self.config.tie_word_embeddings
        for name, p in self.named_parameters():
            if name == "lm_head.weight" and tied_copy:
                continue
            t = p.grad if grads else p.data
            if t is None:
                t = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            if hasattr(t, "full_tensor"):  # sharded by FSDP2 over DP: a collective of the DP group
                t = t.full_tensor()
            yield name, t.detach()

    def gather_full(self, grads: bool = False, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """Full (unsharded) parameters or gradients of the whole model on rank ``dst``
        (gathered from the first data-parallel replica)."""
        t, c = self.topo, self.config
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
        return {k: sharding.unshard(k, [pieces[i] for i in range(t.tp)], c, t.tp) for k, pieces in by_key.items()}
