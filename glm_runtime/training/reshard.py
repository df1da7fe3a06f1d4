"""Resume a training checkpoint on a different (TP, PP, DP) layout.

AdamW's state is elementwise: its two moments have the shape of their parameter, so they
are cut exactly like the weights. The checkpoint of the old layout is read whole (the
first data-parallel replica's ranks; the others hold copies), every weight and moment is
put back together with ``glm_runtime.core.sharding.unshard`` (the native keys the parallel model
keeps), and each rank of the new layout cuts its own part with ``glm_runtime.core.sharding.shard``.
The data position, loss scaler and RNG states are the same on every rank and are taken
from rank 0. Every rank reads the whole checkpoint: fine for the models trained here; a
large model would stream it key by key.
"""
from __future__ import annotations

from pathlib import Path

import torch

from glm_runtime.converters.tensor_io import read_safetensors
from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError
from glm_runtime.core.sharding import shard, unshard


def native_key(name: str, config: GLMConfig) -> str | None:
    """Native key of a trainer parameter name (None: the last stage's copy of a tied embedding)."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    return name


def gather(ckpt: Path, meta: dict, config: GLMConfig) -> tuple[dict, dict, dict, dict]:
    """(weights, exp_avg, exp_avg_sq, rank-0 train state), the first three by native key,
    unsharded, from a checkpoint of any layout."""
    lay = meta["layout"]
    tp, dp = lay["tp"], lay["dp"]
    pieces: dict[str, dict[str, dict[int, torch.Tensor]]] = {"w": {}, "m": {}, "v": {}}
    ts0 = None
    for rank in range(meta["world_size"]):
        tp_rank, dp_rank = rank % tp, (rank // tp) % dp
        if dp_rank:
            continue
        try:
            model = read_safetensors(ckpt / f"model-rank{rank:05d}.safetensors")
            ts = torch.load(ckpt / f"state-rank{rank:05d}.pt", map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint lacks the files of rank {rank}", ckpt) from None
        if "opt_param_names" not in ts:
            raise CheckpointError("checkpoint predates resharding support (no parameter names)", ckpt)
        ts0 = ts if rank == 0 else ts0
        state = ts["optimizer"]["state"]
        for i, name in enumerate(ts["opt_param_names"]):
            key = native_key(name, config)
            if key is None:
                continue
            pieces["w"].setdefault(key, {})[tp_rank] = model[name]
            if i in state:
                pieces["m"].setdefault(key, {})[tp_rank] = state[i]["exp_avg"]
                pieces["v"].setdefault(key, {})[tp_rank] = state[i]["exp_avg_sq"]
    full = {k: {key: unshard(key, [p[r] for r in range(tp)], config, tp) for key, p in d.items()}
            for k, d in pieces.items()}
    return full["w"], full["m"], full["v"], ts0


def load_into(trainer, ckpt: Path, meta: dict, tp: int, tp_rank: int) -> dict:
    """Fill ``trainer``'s weights and AdamW state from ``ckpt`` (any layout); returns the
    rank-0 train state (data position, scaler, RNG, step)."""
    config = trainer.model.config
    w, m, v, ts = gather(ckpt, meta, config)
    step = None
    for i, s in ts["optimizer"]["state"].items():
        step = s["step"]
        break
    by_name = dict(trainer.master.named())
    for name, p in by_name.items():
        key = native_key(name, config) or "embed.weight"
        if key not in w:
            raise CheckpointError(f"checkpoint has no weights for {key}", ckpt)
        with torch.no_grad():
            p.copy_(shard(key, w[key], config, tp, tp_rank))
        if key in m and step is not None:
            trainer.opt.state[p] = {"step": step.clone(),
                                    "exp_avg": shard(key, m[key], config, tp, tp_rank).clone().to(p.dtype),
                                    "exp_avg_sq": shard(key, v[key], config, tp, tp_rank).clone().to(p.dtype)}
    trainer.master.copy_to_model()
    return ts
