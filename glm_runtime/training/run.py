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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from glm_runtime.converters import native
from glm_runtime.core.build import build_model
from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import GLMError
from glm_runtime.core.files import writing
from glm_runtime.core.presets import PRESETS
from glm_runtime.core.schema import (
    OPTIONAL_TEXT,
    TEXT,
    Rule,
    check_fields,
    from_mapping,
    integer,
    one_of,
    rule_of,
    shown,
    spec,
)
from glm_runtime.core.tokenizer import Tokenizer
from glm_runtime.parallel.bootstrap import discover
from glm_runtime.parallel.topology import get_topology

from . import data
from .collator import SEQ_LEN, Collator, ObjectiveConfig, SpecialIds
from .distributed import ParallelTrainer
from .optim import OptimConfig
from .scaler import PRECISIONS, ScalerConfig
from .stability import deepnorm_state
from .trainer import TrainConfig, Trainer


@dataclass
class DataConfig:
    """The ``data:`` section."""

    corpus: str = spec(TEXT, "data/corpus")
    vocab_size: int = spec(integer(64, 2**20), 8000)  # of the sentencepiece model trained when none is given
    heldout_every: int = spec(integer(2, 2**31 - 1), 32)  # 1 document in this many is held out
    seq_len: int = spec(SEQ_LEN, 256)
    tokenizer: str | None = spec(OPTIONAL_TEXT, None)

    def __post_init__(self):
        check_fields(self, "data")


@dataclass
class TrainingConfig:
    """A training config file's top level: every key with its type and range. The keys the
    trainer reads share :class:`TrainConfig`'s rules; the sections are their own classes
    (the ``model:`` section is a preset name plus GLMConfig fields, checked by GLMConfig)."""

    run_dir: str = spec(rule_of(TrainConfig, "run_dir"))
    steps: int = spec(rule_of(TrainConfig, "steps"))
    seed: int = spec(rule_of(TrainConfig, "seed"), 0)
    threads: int | None = spec(integer(1, 4096, optional=True), None)
    precision: str = spec(rule_of(TrainConfig, "precision"), "fp32")
    backend: str | None = spec(OPTIONAL_TEXT, None)
    export: str | None = spec(OPTIONAL_TEXT, None)
    embed_grad_alpha: float = spec(rule_of(TrainConfig, "embed_grad_alpha"), 0.1)
    eval_interval: int = spec(rule_of(TrainConfig, "eval_interval"), 0)
    eval_batches: int = spec(rule_of(TrainConfig, "eval_batches"), 4)
    save_interval: int = spec(rule_of(TrainConfig, "save_interval"), 100)
    keep_checkpoints: int = spec(rule_of(TrainConfig, "keep_checkpoints"), 2)
    strict_ops: bool | None = spec(Rule("bool", optional=True), None)
    tp: int = spec(integer(1, 4096), 1)
    pp: int = spec(integer(1, 4096), 1)
    schedule: str = spec(one_of("1f1b", "gpipe"), "1f1b")
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaler: ScalerConfig = field(default_factory=ScalerConfig)

    def __post_init__(self):
        check_fields(self, "training config")
        if not isinstance(self.model, dict):
            raise GLMError(f"training config: model={shown(self.model)}: expected a mapping (preset: NAME and "
                           "GLMConfig fields)")
        fields = {f.name for f in dataclasses.fields(GLMConfig)}
        for key, value in self.model.items():  # each field now; how they fit together once the vocabulary is known
            if key == "preset":
                one_of(*PRESETS).check("preset", value, what="model")
            elif key not in fields:
                raise GLMError(f"unknown model field {shown(key)} (a preset name or a GLMConfig field)")
            else:
                rule_of(GLMConfig, key).check(key, value, what="model")
        for name, cls in (("data", DataConfig), ("objective", ObjectiveConfig), ("optim", OptimConfig),
                          ("scaler", ScalerConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                setattr(self, name, from_mapping(cls, value or {}, name))


def parse(cfg: dict, source=None) -> TrainingConfig:
    """The training config a file's mapping describes (unknown keys, bad values and bad
    sections are one-line errors naming the key, the value and what it may be)."""
    return from_mapping(TrainingConfig, cfg, "training config", source)


def model_config(model: dict, tok: Tokenizer) -> GLMConfig:
    """The GLMConfig of a ``model:`` section (a preset plus field overrides) for ``tok``'s ids."""
    m = dict(model)
    base = dict(PRESETS[one_of(*PRESETS).check("preset", m.pop("preset", "tiny-glm-130b"), what="model")])
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


def _topology(cfg: TrainingConfig, backend):
    """The parallel layout when the run asks for one or was started by a launcher, else None."""
    if cfg.tp * cfg.pp == 1 and discover().world_size == 1:
        return None
    return get_topology(cfg.tp, cfg.pp, None, backend)


def check_inputs(cfg: TrainingConfig) -> tuple[list[Path], Path]:
    """(corpus files, tokenizer file) of a run, refused before anything is written when the
    corpus or a given tokenizer is missing, or the export would overlap an input."""
    run_dir = Path(cfg.run_dir)
    files = data.corpus_files(cfg.data.corpus)
    tok_file = Path(cfg.data.tokenizer) if cfg.data.tokenizer else run_dir / "tokenizer.model"
    if cfg.data.tokenizer and not tok_file.is_file():
        raise GLMError("tokenizer model not found", tok_file)
    if cfg.export:  # refused now, not after the training: finish() replaces the export directory
        native.refuse_overlap(cfg.export, [run_dir, cfg.data.corpus, tok_file])
    return files, tok_file


def prepare(cfg: dict, backend, progress: bool = True) -> tuple[Trainer, dict]:
    """Build everything a run needs; returns the trainer and a context for ``finish``."""
    cfg = parse(cfg)
    run_dir = Path(cfg.run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    topo = _topology(cfg, backend)
    first = topo is None or topo.rank == 0
    d = cfg.data
    files, tok_file = check_inputs(cfg)
    if first:  # one rank makes the tokenizer and the shards; the others wait and read them
        with writing(run_dir, "run directory"):
            run_dir.mkdir(parents=True, exist_ok=True)
        if not tok_file.is_file():
            data.train_tokenizer(files, run_dir / "tokenizer", d.vocab_size, d.heldout_every)
        data.build_shards(files, Tokenizer(tok_file), run_dir / "shards", d.heldout_every, progress=progress)
    if topo is not None:
        dist.barrier()
    tok = Tokenizer(tok_file)
    shards = run_dir / "shards"
    config = model_config(cfg.model, tok)
    if d.seq_len > config.max_position_embeddings:
        raise GLMError(f"data: seq_len={d.seq_len} exceeds the model's max_position_embeddings="
                       f"{config.max_position_embeddings}")

    dtype = PRECISIONS[cfg.precision]
    if dtype not in backend.capabilities().compute_dtypes:
        have = ", ".join(str(t).replace("torch.", "") for t in backend.capabilities().compute_dtypes)
        raise GLMError(f"backend {backend.name!r} cannot compute in {cfg.precision} (it computes in {have}); "
                       f"use precision: fp32")

    state = {k: v.to(dtype) for k, v in deepnorm_state(config, cfg.seed).items()}
    model = build_model(config, state, backend, strict_ops=cfg.strict_ops, trainable=True)

    ids = SpecialIds.from_tokenizer(tok)
    train_stream = data.TokenStream.open(shards, "train")
    held_stream = data.TokenStream.open(shards, "heldout")
    collator = Collator(train_stream, d.seq_len, cfg.objective, ids, seed=cfg.seed)

    def eval_collator():
        return Collator(held_stream, d.seq_len, cfg.objective, ids, seed=12345)

    tc = TrainConfig(run_dir=str(run_dir), steps=cfg.steps, seq_len=d.seq_len, seed=cfg.seed, precision=cfg.precision,
                     embed_grad_alpha=cfg.embed_grad_alpha, eval_interval=cfg.eval_interval,
                     eval_batches=cfg.eval_batches, save_interval=cfg.save_interval,
                     keep_checkpoints=cfg.keep_checkpoints, optim=cfg.optim, objective=cfg.objective,
                     scaler=cfg.scaler)
    extra = {"model_config": config.to_dict(),
             "tokenizer_sha1": hashlib.sha1(tok.sp.serialized_model_proto()).hexdigest()}
    if topo is None:
        trainer = Trainer(model, collator, tc, eval_collator, extra_state=extra, progress=progress)
    else:
        trainer = ParallelTrainer(model, collator, tc, topo, cfg.schedule, eval_collator,
                                  extra_state=extra, progress=progress)
    return trainer, {"config": config, "tokenizer": tok_file, "run_dir": run_dir, "export": cfg.export}


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
