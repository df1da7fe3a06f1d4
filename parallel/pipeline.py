"""Pipeline parallelism: training with torch's pipelining schedules.

Which layers each stage holds is :mod:`.stages` (inference needs it without this module's
import of torch.distributed.pipelining, which pulls in torch's compiler: seconds per process).

Schedules are torch.distributed.pipelining's: ``1f1b`` (Schedule1F1B, the PipeDream-Flush
schedule GLM-130B trained with) and ``gpipe`` (ScheduleGPipe). A stage's inputs are the
hidden state (token ids on the first stage), the position ids and the attention mask;
the ids and mask ride along between stages so every stage builds its rotary angles and
attends with the same mask, whatever micro-batch it is working on.

The bubble: with p stages of equal cost and m micro-batches, a rank idles for a fraction
(p - 1) / (m + p - 1) of a step. :func:`measure_bubble` measures the idle share of real
steps (time outside the stage's forward and backward calls) to compare with that figure.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from glm_runtime.core.errors import GLMError

from .data import wrap_ddp

SCHEDULES = ("1f1b", "gpipe")


def bubble_theory(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


class _Stage(nn.Module):
    """What a pipelining stage runs: (ids | hidden, positions, mask) -> same for the next
    stage, or local-vocabulary logits on the last."""

    def __init__(self, pmodel):
        super().__init__()
        self.pmodel = pmodel

    def forward(self, x, position_ids, mask):
        y = self.pmodel.stage_forward(x, position_ids, mask.bool())
        return y if self.pmodel.last else (y, position_ids, mask)


class PipelineTrainer:
    """One training step (forward, backward, gradient finalisation) of a pipelined model.

    ``data_parallel``: "ddp" wraps the stage in DistributedDataParallel over the DP group
    (torch's pipelining defers its all-reduce to the last micro-batch), None for no DP.
    """

    def __init__(self, pmodel, microbatches: int, schedule: str = "1f1b", data_parallel: str | None = None):
        if schedule not in SCHEDULES:
            raise GLMError(f"unknown pipeline schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
        self.pmodel, self.m, self.schedule_name = pmodel, microbatches, schedule
        t = pmodel.topo
        if schedule == "1f1b" and microbatches < t.pp:
            raise GLMError(f"1F1B needs at least as many micro-batches as stages ({microbatches} < {t.pp}); "
                           "use more micro-batches or gpipe")
        self.topo = t
        self.module = _Stage(pmodel)
        sub = self.module
        if data_parallel == "ddp" and t.dp > 1:
            sub = wrap_ddp(self.module, t)
        device = pmodel.device
        self.stage = PipelineStage(sub, t.pp_rank, t.pp, device, group=t.pp_group)
        cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        self.schedule = cls(self.stage, microbatches, loss_fn=self._loss)

    def _loss(self, logits, targets):
        return self.pmodel.loss(logits, targets)

    def step(self, input_ids, targets, position_ids, mask) -> torch.Tensor:
        """Run the schedule over ``m`` micro-batches of this rank's batch; returns the mean
        loss (on every rank of the pipeline)."""
        t = self.topo
        if input_ids.shape[0] % self.m:
            raise GLMError(f"batch of {input_ids.shape[0]} rows does not split into {self.m} micro-batches")
        losses = []
        if t.is_first_stage:
            self.schedule.step(input_ids, position_ids, mask.to(torch.uint8),
                               target=targets if t.is_last_stage else None)
        elif t.is_last_stage:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        self.pmodel.finalize_grads()
        loss = torch.stack(losses).mean().detach() if t.is_last_stage else torch.zeros(())
        dist.broadcast(loss, src=t.stage_rank(t.pp - 1), group=t.pp_group)
        return loss


def measure_bubble(trainer: PipelineTrainer, batch: tuple, repeats: int = 3) -> dict:
    """Measured and theoretical bubble fraction of pipelined steps on this rank.

    The stage's compute calls (torch's ``forward_one_chunk`` / ``backward_one_chunk``) are
    timed inside real steps; ``bubble = 1 - busy / step`` is the share of the step this
    rank spent waiting (for activations, gradients or the end of the pipeline). All ranks
    start each step together after a barrier; the first step (shape inference) is not
    counted and the step with the smallest bubble is reported (on a shared host the least
    disturbed one). Point-to-point transfer time counts as bubble, as it does in practice.
    """
    t = trainer.topo
    stage = trainer.stage
    busy = [0.0]

    def timed(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                busy[0] += time.perf_counter() - t0
        return run

    originals = stage.forward_one_chunk, stage.backward_one_chunk
    stage.forward_one_chunk, stage.backward_one_chunk = timed(originals[0]), timed(originals[1])
    runs = []
    try:
        for i in range(repeats + 1):
            dist.barrier()
            busy[0] = 0.0
            t0 = time.perf_counter()
            trainer.step(*batch)
            step = time.perf_counter() - t0
            if i:
                runs.append((1 - busy[0] / step, step, busy[0]))
    finally:
        stage.forward_one_chunk, stage.backward_one_chunk = originals
    for p in trainer.pmodel.parameters():
        p.grad = None
    bubble, step, work = min(runs)
    return {"stage": t.pp_rank, "stages": t.pp, "microbatches": trainer.m, "schedule": trainer.schedule_name,
            "t_step": step, "t_busy": work, "bubble": bubble, "theory": bubble_theory(t.pp, trainer.m)}
