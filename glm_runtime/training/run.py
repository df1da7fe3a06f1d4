"""From a training config file to a finished run: tokenizer, shards, model, trainer, export.

A training config (YAML or JSON) has top-level run settings and sections::

    run_dir: runs/glm-tiny          # checkpoints, train.jsonl, tokenizer, shards, model/
    steps: 1000
    seed: 1
    threads: 2                      # torch intra-op threads (fixed: results depend on it)
    precision: fp32                 # fp32 | fp16 | bf16 (what the backend can compute)
    backend: cpu
    model:   {preset: tiny-glm-130b, hidden_size: ..., ...}   # preset + field overrides
    data:    {corpus: data/corpus, vocab_size: 8000, heldout_every: 32, seq_len: 256}
    objective: {...}                # glm_runtime.training.collator.ObjectiveConfig
    optim:   {...}                  # glm_runtime.training.optim.OptimConfig
    scaler:  {...}                  # glm_runtime.training.scaler.ScalerConfig
    export:  path                   # optional: also write the final model there

The model's vocabulary is the tokenizer's pieces plus GLM's five special tokens appended
after them ([MASK] [gMASK] [sMASK] sop eop, as glm_runtime.core.tokenizer lays them out).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
import torch.distributed as dist

from glm_runtime.converters import native
from glm_runtime.core.build import build_model
from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import GLMError
from glm_runtime.core.presets import PRESETS
from glm_runtime.core.tokenizer import Tokenizer
from glm_runtime.parallel.bootstrap import discover
from glm_runtime.parallel.topology import get_topology

from . import data
from .collator import Collator, ObjectiveConfig, SpecialIds
from .distributed import ParallelTrainer
from .optim import OptimConfig
from .scaler import PRECISIONS, ScalerConfig
from .stability import deepnorm_state
from .trainer import TrainConfig, Trainer

TOP_KEYS = {"run_dir", "steps", "seed", "threads", "precision", "backend", "model", "data", "objective", "optim",
            "scaler", "export", "embed_grad_alpha", "eval_interval", "eval_batches", "save_interval",
            "keep_checkpoints", "strict_ops", "tp", "pp", "schedule"}
DATA_KEYS = {"corpus", "vocab_size", "heldout_every", "seq_len", "tokenizer"}


def _section(cls, d: dict | None, name: str):
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise GLMError(f"unknown {name} option(s): {', '.join(unknown)}")
    return cls(**d)


def parse(cfg: dict) -> dict:
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise GLMError(f"unknown training config key(s): {', '.join(unknown)}")
    for k in ("run_dir", "steps"):
        if k not in cfg:
            raise GLMError(f"training config needs '{k}'")
    d = dict(cfg.get("data") or {})
    bad = sorted(set(d) - DATA_KEYS)
    if bad:
        raise GLMError(f"unknown data option(s): {', '.join(bad)}")
    return cfg


def model_config(cfg: dict, tok: Tokenizer) -> GLMConfig:
    m = dict(cfg.get("model") or {})
    preset = m.pop("preset", "tiny-glm-130b")
    if preset not in PRESETS:
        raise GLMError(f"unknown model preset {preset!r}")
    base = dict(PRESETS[preset])
    n = tok.sp.get_piece_size()
    base.update(vocab_size=tok.vocab_size, mask_token_id=n, gmask_token_id=n + 1, smask_token_id=n + 2,
                sop_token_id=n + 3, eop_token_id=n + 4, pad_token_id=tok.pad_id,
                eos_token_ids=[n + 4] + ([tok.eos_id] if tok.eos_id is not None else []),
                torch_dtype="float32")
    if "family" not in m and base["family"] == "glm-130b":
        # To the tokenizer wrapper, "glm-130b" means icetk's id layout (20,000 image ids
        # before the text); a model trained here has its own sentencepiece layout.
        base["family"] = "glm-130b-style"
    base.update(m)
    return GLMConfig(**base)


def _topology(cfg: dict, backend):
    """The parallel layout when the run asks for one or was started by a launcher, else None."""
    tp, pp = int(cfg.get("tp", 1)), int(cfg.get("pp", 1))

    if tp * pp == 1 and discover().world_size == 1:
        return None

    return get_topology(tp, pp, None, backend)


def prepare(cfg: dict, backend, progress: bool = True) -> tuple[Trainer, dict]:
    """Build everything a run needs; returns the trainer and a context for ``finish``."""
    cfg = parse(cfg)
    run_dir = Path(cfg["run_dir"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    topo = _topology(cfg, backend)
    first = topo is None or topo.rank == 0
    d = cfg.get("data") or {}
    files = data.corpus_files(d.get("corpus", "data/corpus"))
    every = int(d.get("heldout_every", 32))
    tok_file = Path(d["tokenizer"]) if d.get("tokenizer") else run_dir / "tokenizer.model"
    if first:  # one rank makes the tokenizer and the shards; the others wait and read them
        run_dir.mkdir(parents=True, exist_ok=True)
        if not tok_file.is_file():
            if d.get("tokenizer"):
                raise GLMError("tokenizer model not found", tok_file)
            data.train_tokenizer(files, run_dir / "tokenizer", int(d.get("vocab_size", 8000)), every)
        data.build_shards(files, Tokenizer(tok_file), run_dir / "shards", every, progress=progress)
    if topo is not None:
        dist.barrier()
    tok = Tokenizer(tok_file)
    shards = run_dir / "shards"
    config = model_config(cfg, tok)

    precision = cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise GLMError(f"precision {precision!r}, expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype not in backend.capabilities().compute_dtypes:
        have = ", ".join(str(t).replace("torch.", "") for t in backend.capabilities().compute_dtypes)
        raise GLMError(f"backend {backend.name!r} cannot compute in {precision} (it computes in {have}); "
                       f"use precision: fp32")

    seed = int(cfg.get("seed", 0))
    state = {k: v.to(dtype) for k, v in deepnorm_state(config, seed).items()}
    model = build_model(config, state, backend, strict_ops=cfg.get("strict_ops"), trainable=True)

    seq_len = int(d.get("seq_len", 256))
    objective = _section(ObjectiveConfig, cfg.get("objective"), "objective")
    ids = SpecialIds.from_tokenizer(tok)
    train_stream = data.TokenStream.open(shards, "train")
    held_stream = data.TokenStream.open(shards, "heldout")
    collator = Collator(train_stream, seq_len, objective, ids, seed=seed)

    def eval_collator():
        return Collator(held_stream, seq_len, objective, ids, seed=12345)

    tc = TrainConfig(run_dir=str(run_dir), steps=int(cfg["steps"]), seq_len=seq_len, seed=seed, precision=precision,
                     embed_grad_alpha=float(cfg.get("embed_grad_alpha", 0.1)),
                     eval_interval=int(cfg.get("eval_interval", 0)), eval_batches=int(cfg.get("eval_batches", 4)),
                     save_interval=int(cfg.get("save_interval", 100)),
                     keep_checkpoints=int(cfg.get("keep_checkpoints", 2)),
                     optim=_section(OptimConfig, cfg.get("optim"), "optim"), objective=objective,
                     scaler=_section(ScalerConfig, cfg.get("scaler"), "scaler"))
    extra = {"model_config": config.to_dict(),
             "tokenizer_sha1": hashlib.sha1(tok.sp.serialized_model_proto()).hexdigest()}
    if topo is None:
        trainer = Trainer(model, collator, tc, eval_collator, extra_state=extra, progress=progress)
    else:
        trainer = ParallelTrainer(model, collator, tc, topo, cfg.get("schedule", "1f1b"), eval_collator,
                                  extra_state=extra, progress=progress)
    return trainer, {"config": config, "tokenizer": tok_file, "run_dir": run_dir, "export": cfg.get("export")}


def finish(trainer: Trainer, ctx: dict) -> list[Path]:
    """Write the trained weights as a native checkpoint (run_dir/model, and ``export``);
    under a parallel layout they are gathered to rank 0, which writes them."""
    if hasattr(trainer, "full_state"):
        state = trainer.full_state()
        if state is None:
            return []
    else:
        state = trainer.master.state_dict()
    state = {k: v.detach().float().clone() for k, v in state.items()}
    outs = [ctx["run_dir"] / "model"]
    if ctx.get("export"):
        outs.append(Path(ctx["export"]))
    for out in outs:
        native.save(out, ctx["config"], state, tokenizer=ctx["tokenizer"], overwrite=True)
    return outs
