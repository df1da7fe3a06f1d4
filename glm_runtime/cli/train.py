"""``glmrt train``: train a GLM from a config file (or flags), resuming if the run directory
already holds a checkpoint.

The run directory is locked for the whole run (:func:`glm_runtime.core.files.exclusive_lock`):
two trainers on one directory would interleave checkpoints and logs, so the second gets a
one-line refusal naming the first. Holding the lock also makes every temporary checkpoint
directory there a dead run's, removed at the start.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from glm_runtime.core.errors import GLMError
from glm_runtime.core.files import exclusive_lock, writing
from glm_runtime.core.registry import get_backend
from glm_runtime.parallel.launchenv import discover
from glm_runtime.training import checkpoint
from glm_runtime.training.run import check_inputs, finish, parse, prepare

from .common import read_config_file

RUN_LOCK = ".lock"  # in the run directory: held by the trainer (its pid, host and command inside)

NAME = "train"
HELP = "train a GLM with the blank-infilling objective (resumes from the run directory's last checkpoint)"
EXAMPLE = "glmrt train configs/glm-tiny.yaml"


def add_arguments(p):
    # the values are checked with the training config's (glm_runtime.training.run.TrainingConfig)
    p.add_argument("train_config", nargs="?", help="training config (YAML or JSON); see docs/training.md")
    p.add_argument("--run-dir", help="run directory (checkpoints, train.jsonl, exported model)")
    p.add_argument("--steps", type=int, help="total optimiser steps")
    p.add_argument("--corpus", help="corpus directory or file (default data/corpus)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads (results are reproducible for a fixed count)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--save-interval", type=int)
    p.add_argument("--export", help="also write the final model to this directory (native format)")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks (run under a launcher, e.g. mpiexec)")
    p.add_argument("--pp", type=int, help="pipeline stages")
    p.add_argument("--schedule", choices=("1f1b", "gpipe"), help="pipeline schedule (default 1f1b)")
    p.add_argument("--backend", help="backend name (default: the config's, else auto)")
    p.add_argument("--strict-ops", action="store_true", default=None,
                   help="fail instead of falling back to a reference op")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")


def run(args) -> int:
    cfg = read_config_file(args.train_config, "training config") if args.train_config else {}
    if not isinstance(cfg, dict):
        raise GLMError(f"a training config is a mapping of keys to values, got {type(cfg).__name__}",
                       args.train_config)
    for key, val in (("run_dir", args.run_dir), ("steps", args.steps), ("seed", args.seed),
                     ("threads", args.threads), ("precision", args.precision),
                     ("save_interval", args.save_interval), ("export", args.export),
                     ("strict_ops", args.strict_ops), ("tp", args.tp), ("pp", args.pp),
                     ("schedule", args.schedule)):
        if val is not None:
            cfg[key] = val
    for key, val in (("corpus", args.corpus), ("seq_len", args.seq_len)):
        if val is not None:
            if not isinstance(cfg.setdefault("data", {}), dict):
                raise GLMError(f"training config: data={cfg['data']!r}: expected a mapping", args.train_config)
            cfg["data"][key] = val
    if "run_dir" not in cfg or "steps" not in cfg:
        raise GLMError("give a training config, or at least --run-dir and --steps")
    parsed = parse(cfg, args.train_config)
    check_inputs(parsed)  # before the run directory is made: a bad input leaves nothing behind
    run_dir = Path(parsed.run_dir)
    backend = get_backend(args.backend, cfg.get("backend"), needs_graph=True)
    with contextlib.ExitStack() as held:
        if discover(use_mpi=False).rank == 0:  # one lock for the job: its first rank holds it
            with writing(run_dir, "run directory"):
                run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive_lock(run_dir / RUN_LOCK, f"run directory {run_dir}"))
            checkpoint.remove_temporaries(run_dir / "checkpoints")
        return _train(cfg, backend, args)


def _train(cfg: dict, backend, args) -> int:
    trainer, ctx = prepare(cfg, backend, progress=not args.no_progress)
    records = trainer.fit()
    outs = finish(trainer, ctx)
    if not outs:  # a parallel run's other ranks: rank 0 reports
        return 0
    if records:
        last = records[-1]
        extra = f", held-out loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""
        print(f"trained steps {records[0]['step']}..{trainer.step}: final loss {last['loss']:.4f}{extra}", file=sys.stderr)
    print(f"model written to {', '.join(str(o) for o in outs)}", file=sys.stderr)
    return 0
