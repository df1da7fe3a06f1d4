"""The training loop under tensor x pipeline x data parallelism (the ``parallel`` package).

Same loop as :class:`~glm_runtime.training.trainer.Trainer`; what changes:

* the model is this rank's part (:class:`glm_runtime.parallel.model.ParallelModel`): its TP shards of
  its pipeline stage's layers; the loss is the vocab-parallel cross-entropy;
* every rank builds the *same* global batch from the same collator state (so every
  pipeline stage and tensor shard sees the same samples, and the data position saved in
  each rank's checkpoint is the same) and keeps its data-parallel replica's rows;
* pipelines run torch's 1F1B (or GPipe) schedule over the step's micro-batches; with one
  stage the micro-batches are run in turn; gradients are averaged over data-parallel
  replicas once per step (one flat all-reduce);
* the loss keeps the single-process definition, the mean over *all* target tokens of the
  global batch: each micro-batch's mean is weighted by its share of the targets (times
  the replica count, which the replica averaging divides out, and times the micro-batch count,
  which the pipelining schedule's gradient scaling divides out);
* gradient norms (total and embedding) are summed over all ranks, counting a tensor
  replicated over TP ranks (norms, biases of row-parallel linears) and the last stage's
  copy of a tied embedding once; every rank clips with the same factor;
* checkpoints are per rank (``model-rankXXXXX`` / ``state-rankXXXXX``) with barriers around
  the atomic rename; the exported model is gathered to rank 0 in native format.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from glm_runtime.core.errors import GLMError
from glm_runtime.core.model import parameter_shapes
from glm_runtime.parallel.model import ParallelModel

from . import checkpoint
from .collator import Batch
from .optim import batch_size_at
from .trainer import Trainer


def _rows(b: Batch, lo: int, hi: int) -> Batch:
    return Batch(b.input_ids[lo:hi], b.position_ids[lo:hi], b.mask[lo:hi], b.targets[lo:hi], b.segment[lo:hi],
                 b.objectives[lo:hi])


class ParallelTrainer(Trainer):
    def __init__(self, model, collator, cfg, topo, schedule: str = "1f1b", make_eval_collator=None,
                 extra_state=None, progress: bool = True):
        self.topo = topo
        pm = ParallelModel(model, topo)
        pm.requires_grad_(True)
        super().__init__(pm, collator, cfg, make_eval_collator, extra_state, progress=progress and topo.rank == 0)
        self.layout = {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp}
        if cfg.optim.micro_batch_size % topo.dp:
            raise GLMError(f"micro_batch_size {cfg.optim.micro_batch_size} does not split over dp={topo.dp}")
        self.schedule = schedule
        self._pipelines: dict[int, object] = {}
        # pipeline micro-batches per collator micro-batch (1F1B needs >= 1 per stage)
        rows = cfg.optim.micro_batch_size // topo.dp
        self._pipe_m = next((d for d in range(topo.pp, rows + 1) if rows % d == 0), 0) if topo.pp > 1 else 1
        if not self._pipe_m:
            raise GLMError(f"micro_batch_size / dp = {rows} rows cannot be cut into >= {topo.pp} pipeline "
                           f"micro-batches of equal size")
        shapes = parameter_shapes(model.config)
        tied_copy = model.config.tie_word_embeddings and topo.pp > 1 and topo.is_last_stage
        self._count_once = {}
        for name, p in pm.named_parameters():
            replicated = topo.tp > 1 and name in shapes and tuple(p.shape) == shapes[name][0]
            skip = (name == "lm_head.weight" and tied_copy) or (replicated and topo.tp_rank != 0)
            self._count_once[name] = not skip

    # ------------------------------------------------------------ rank roles
    @property
    def is_writer(self) -> bool:
        return self.topo.rank == 0

    def _pipe(self, m: int):
        """The pipelining schedule for ``m`` micro-batches (one per count: batch-size warm-up
        changes the count)."""
        if m not in self._pipelines:
            # here, not at the top: torch's pipelining imports its compiler stack (~3 s per
            # process), which only pipelined training needs (tests/test_layers.py lists it)
            from glm_runtime.parallel.pipeline import PipelineTrainer

            trainer = self

            class _Weighted(PipelineTrainer):
                def _loss(self, logits, targets):
                    n = (targets != -100).sum()
                    return self.pmodel.loss(logits, targets) * (n * trainer._w_scale)

            self._pipelines[m] = _Weighted(self.model, microbatches=m, schedule=self.schedule)
        return self._pipelines[m]

    def _average_over_replicas(self) -> None:
        """Data parallelism: average the gradients over the DP group, once per step, in one
        flat buffer. (Not DDP: wrapping one stage module for several schedules, one per
        micro-batch count, breaks DDP's bucket bookkeeping.)"""
        t = self.topo
        if t.dp == 1:
            return
        ps = [p for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, group=t.dp_group)
        flat /= t.dp
        at = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[at:at + n].view_as(p.grad))
            at += n

    # ---------------------------------------------------------------- state
    def save(self):
        return checkpoint.save(self.ckpt_root, self.step, self.topo.rank, self.topo.world_size, self.layout,
                               self.master.state_dict(), self._train_state(), barrier=dist.barrier,
                               keep=self.cfg.keep_checkpoints)

    def resume(self) -> int:
        ck = None
        if self.topo.rank == 0:
            found = checkpoint.latest(self.ckpt_root)
            ck = None if found is None else str(found)
        box = [ck]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return 0

        return self._restore(Path(box[0]), self.topo.tp, self.topo.tp_rank)

    def full_state(self) -> dict | None:
        """The whole model's weights on rank 0 (None elsewhere)."""
        return self.model.gather_full()

    # ----------------------------------------------------------------- step
    def train_step(self) -> dict:
        cfg, step, t = self.cfg, self.step, self.topo
        t0 = time.perf_counter()
        bs = batch_size_at(step, cfg.optim)
        mb = cfg.optim.micro_batch_size
        dev = self.model.device
        micro = [self.collator.next_batch(mb).to(dev) for _ in range(bs // mb)]
        n_all = sum(b.n_targets for b in micro)
        lo, hi = t.dp_rank * mb // t.dp, (t.dp_rank + 1) * mb // t.dp
        local = [_rows(b, lo, hi) for b in micro]
        scale = self.scaler.scale
        self.model.train()
        self.master.zero_grad()
        if t.pp == 1:
            loss_value = 0.0
            for b in local:
                w = b.n_targets * t.dp / n_all
                loss = self.model.loss(self.model(b.input_ids, b.position_ids, b.mask, gather=False), b.targets)
                (loss * (w * scale)).backward()
                loss_value += float(loss.detach()) * w
            self.model.finalize_grads()
            replica_loss = torch.tensor(loss_value, dtype=torch.float64)
        else:
            # One schedule run over the step's rows, cut into pipeline micro-batches of the
            # size chosen at start (a second run would be wrong: the schedule divides all
            # accumulated gradients by its micro-batch count at the end of each run).
            m = len(local) * self._pipe_m
            self._w_scale = t.dp * m * scale / n_all
            cat = lambda f: torch.cat([getattr(b, f) for b in local])  # noqa: E731
            out = self._pipe(m).step(cat("input_ids"), cat("targets"), cat("position_ids"), cat("mask"))
            replica_loss = out.detach().double() / scale  # the run's mean of the weighted losses
        self._average_over_replicas()
        # Every rank of a replica holds its replica's share (times dp); the global loss is
        # the mean of the shares over replicas, i.e. the sum over all ranks / world size.
        dist.all_reduce(replica_loss)
        loss_value = float(replica_loss) / t.world_size
        total, norms = self.master.unscale_grads(scale)
        sq = torch.tensor([sum(v * v for k, v in norms.items() if self._count_once[k]),
                           norms.get("embed.weight", 0.0) ** 2 if t.is_first_stage else 0.0], dtype=torch.float64)
        dist.all_reduce(sq)
        sq /= t.dp  # every data-parallel replica holds the same gradients
        total, embed = math.sqrt(sq[0]), math.sqrt(sq[1])
        return self._apply_step(loss_value, total, embed, scale, micro, bs, t0)
