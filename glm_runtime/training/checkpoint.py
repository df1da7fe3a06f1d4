"""Training checkpoints: atomic, one file set per rank.

Layout of a run directory::

    checkpoints/
      step-00000200/
        meta.json                  step, layout (tp, pp, dp), world size, files, the run's model config
        model-rank00000.safetensors   fp32 (master) weights of this rank's shard
        state-rank00000.pt         optimizer, loss scaler, RNG states, data position
      latest                       name of the newest complete checkpoint

Atomicity: a checkpoint is written into ``.step-XXXXXXXX.tmp`` (every rank writes its own
files there, each file itself written to a temporary name, flushed and renamed), then rank
0 writes meta.json and renames the directory into place, and only then replaces
``latest`` (temp file + ``os.replace``). A process killed at any point leaves either the
old ``latest`` pointing at a complete checkpoint or the new one complete; a stale temp
directory is removed by the next save, and ``glmrt train`` removes every one it finds when
it starts (it holds the run directory's lock: no other writer can be at work there).

``state-*.pt`` holds only tensors, numbers, strings, lists and dicts and is read with
``torch.load(weights_only=True)``: a checkpoint never executes code when loaded.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm_runtime.converters.tensor_io import read_safetensors
from glm_runtime.core.errors import CheckpointError
from glm_runtime.core.files import read_json, read_text, writing

LATEST = "latest"
FORMAT = "glm-runtime-train/1"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save(ckpt_root: str | os.PathLike, step: int, rank: int, world: int, layout: dict,
         model_state: dict[str, torch.Tensor], train_state: dict, barrier=lambda: None, keep: int = 2) -> Path:
    """Save this rank's part of checkpoint ``step``; collective over all ranks (``barrier``)."""
    with writing(ckpt_root, "checkpoint"):  # a full or read-only disk: one line naming the directory
        root = Path(ckpt_root)
        final = root / step_name(step)
        tmp = root / f".{step_name(step)}.tmp"
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        _write_file(tmp / f"model-rank{rank:05d}.safetensors",
                    lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(p)))
        _write_file(tmp / f"state-rank{rank:05d}.pt", lambda p: torch.save(train_state, p))
        barrier()
        if rank == 0:
            meta = {"format": FORMAT, "step": step, "world_size": world, "layout": layout,
                    "ranks": [f"rank{r:05d}" for r in range(world)], "extra": train_state.get("extra")}
            _write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
            _fsync_dir(tmp)
            if final.exists():  # a re-run of the same step replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            _write_file(root / LATEST, lambda p: p.write_text(final.name + "\n"))
            _fsync_dir(root)
            _prune(root, keep)
        barrier()
        return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(d for d in root.glob("step-*") if (d / "meta.json").is_file())
    for d in done[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)


def remove_temporaries(ckpt_root: str | os.PathLike) -> None:
    """Remove the temporary directories of saves that never finished (a killed run's)."""
    for tmp in Path(ckpt_root).glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory, or None when there is none."""
    root = Path(ckpt_root)
    f = root / LATEST
    if not f.is_file():
        return None
    d = root / read_text(f, "checkpoint pointer").strip()
    if not (d / "meta.json").is_file():
        raise CheckpointError(f"'latest' names {d.name}, which is not a complete checkpoint", root)
    return d


def read_meta(ckpt: Path) -> dict:
    meta = read_json(ckpt / "meta.json", "checkpoint metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"not a training checkpoint of format {FORMAT}", ckpt)
    return meta


def load(ckpt: str | os.PathLike, rank: int, world: int, layout: dict) -> tuple[dict, dict, dict]:
    """(meta, model state, train state) of this rank; the layout must match the run's."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if meta["world_size"] != world or meta["layout"] != layout:
        raise CheckpointError(
            f"checkpoint was saved with layout {meta['layout']} on {meta['world_size']} process(es), this run uses "
            f"{layout} on {world}: this reads one rank's files of the same layout (the trainer reshards other "
            f"layouts with glm_runtime.training.reshard)", ckpt)
    mf = ckpt / f"model-rank{rank:05d}.safetensors"
    sf = ckpt / f"state-rank{rank:05d}.pt"
    if not mf.is_file() or not sf.is_file():
        raise CheckpointError(f"checkpoint lacks the files of rank {rank}", ckpt)
    model_state = read_safetensors(mf)
    try:
        train_state = torch.load(sf, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        raise CheckpointError(f"unreadable training state ({type(e).__name__}: {e})", sf) from None
    return meta, model_state, train_state
