"""Serving across ranks (tensor/pipeline parallel): rank 0 schedules, every rank computes.

Rank 0 runs the HTTP server and the engine; before each iteration the engine broadcasts
its plan (slots to reset, prompt chunks, the decode step's tokens) and every other rank
runs :func:`follow`, executing the same model calls on its shard in the same order, so
the collectives inside the model match. The plans are the engine's own small Python
objects (``broadcast_object_list`` within the job's process group), never data from a
client. A rank that dies makes the next collective fail on every other rank: that ends
the job with one line on each (:func:`glm_runtime.parallel.bootstrap.fail_fast`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from glm_runtime.core.generation import DecodeBatch

from .engine import Plan, execute


def broadcaster():
    """Rank 0's side: send one iteration's plan (None: the server stops)."""
    def send(plan: Plan | None) -> None:
        dist.broadcast_object_list([plan], src=0)
    return send


@torch.inference_mode()
def follow(model, config, max_num_seqs: int, max_context: int) -> None:
    """Any other rank's side: execute rank 0's plans until it stops."""
    batch = DecodeBatch(model, max_num_seqs, max_context)
    inputs: dict = {}
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        execute(batch, config, box[0], inputs)
