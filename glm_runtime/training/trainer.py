"""The training loop: GLM objective batches -> loss -> scaled backward -> unscale, check,
clip -> AdamW step or skip -> log; checkpoints and held-out evaluation on a schedule.

One optimiser step consumes a global batch of ``batch_size_at(step)`` rows, built as
micro-batches by the collator. The loss is the mean token cross-entropy (the op table's
``cross_entropy``, fp32) over all target tokens of the global batch, so a step's loss and
gradients do not depend on how the batch is split into micro-batches.

Resumption: everything a step depends on is in the checkpoint (weights, AdamW moments and
step count, loss scaler, collator position and RNG, torch RNG), and the learning rate and
batch size are functions of the step number; a killed run resumed from its last
checkpoint therefore repeats the uninterrupted run's steps bit for bit (on the same
backend, thread count and layout).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from glm_runtime.core.errors import GLMError
from glm_runtime.core.model import GLMModel
from glm_runtime.core.schema import TEXT, check_fields, integer, number, one_of, spec

from . import checkpoint
from .collator import SEQ_LEN, Batch, Collator, ObjectiveConfig
from .monitor import RunLog
from .optim import OptimConfig, batch_size_at, clip_grads, lr_at, make_optimizer, set_lr
from .reshard import load_into
from .scaler import PRECISIONS, LossScaler, MasterWeights, ScalerConfig
from .stability import shrink_embedding_gradient


@dataclass
class TrainConfig:
    run_dir: str = spec(TEXT)
    steps: int = spec(integer(1, 2**31 - 1))
    seq_len: int = spec(SEQ_LEN, 256)
    seed: int = spec(integer(0, 2**63 - 1), 0)
    precision: str = spec(one_of(*PRECISIONS), "fp32")
    embed_grad_alpha: float = spec(number(0, 1, lo_open=True), 0.1)
    eval_interval: int = spec(integer(0, 2**31 - 1), 0)  # 0: evaluate only at the end
    eval_batches: int = spec(integer(1, 2**20), 4)
    save_interval: int = spec(integer(1, 2**31 - 1), 100)
    keep_checkpoints: int = spec(integer(0, 2**20), 2)  # 0: keep every checkpoint
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    scaler: ScalerConfig = field(default_factory=ScalerConfig)

    def __post_init__(self):
        check_fields(self, "training config")


def batch_loss(model: GLMModel, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (fp32, the op table's op)."""
    logits = model(batch.input_ids, batch.position_ids, batch.mask)
    return model.ops.cross_entropy(logits, batch.targets)


@torch.no_grad()
def evaluate(model: GLMModel, make_collator: Callable[[], Collator], batches: int, micro: int) -> dict:
    """Held-out loss per objective and overall (token-weighted), on a fixed set of batches."""
    col = make_collator()
    dev = model.device
    sums: dict[str, list[float]] = {}
    for _ in range(batches):
        for b in _rows(col.next_batch(micro).to(dev)):
            loss = float(batch_loss(model, b))
            s = sums.setdefault(b.objectives[0], [0.0, 0])
            s[0] += loss * b.n_targets
            s[1] += b.n_targets
    out = {f"eval_loss_{k}": v[0] / v[1] for k, v in sorted(sums.items()) if v[1]}
    tot = sum(v[1] for v in sums.values())
    out["eval_loss"] = sum(v[0] for v in sums.values()) / tot
    return out


def _rows(b: Batch):
    for r in range(b.input_ids.shape[0]):
        yield Batch(b.input_ids[r:r + 1], b.position_ids[r:r + 1], b.mask[r:r + 1], b.targets[r:r + 1],
                    b.segment[r:r + 1], b.objectives[r:r + 1])


class Trainer:
    """Single-process trainer over a model built with trainable parameters.

    ``extra_state`` (model config, tokenizer fingerprint) is stored in every checkpoint and
    must match on resume.
    """

    def __init__(self, model: GLMModel, collator: Collator, cfg: TrainConfig,
                 make_eval_collator: Callable[[], Collator] | None = None, extra_state: dict | None = None,
                 progress: bool = True):
        self.model, self.collator, self.cfg = model, collator, cfg
        self.make_eval_collator = make_eval_collator
        self.extra_state = extra_state or {}
        self.progress = progress
        want = PRECISIONS[cfg.precision]
        have = model.dtype
        if have != want:
            raise GLMError(f"precision {cfg.precision} needs a {want} model, the model's parameters are {have}")
        shrink_embedding_gradient(model.ops, cfg.embed_grad_alpha)
        self.master = MasterWeights(list(model.named_parameters()))
        self.opt = make_optimizer(self.master.named(), cfg.optim)
        self.scaler = LossScaler(dynamic=cfg.precision == "fp16", config=cfg.scaler)
        self.layout = {"tp": 1, "pp": 1, "dp": 1}
        self.step = 0
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run log (rank 0 of a parallel run)."""
        return True

    # ---------------------------------------------------------------- state
    def _train_state(self) -> dict:
        name_of = {id(p): n for n, p in self.master.named()}
        return {"step": self.step, "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "data": self.collator.state_dict(), "torch_rng": torch.get_rng_state(),
                "extra": self.extra_state,
                # parameter name of each optimizer-state index: what resharding needs
                "opt_param_names": [name_of[id(p)] for g in self.opt.param_groups for p in g["params"]]}

    def _restore(self, ck: Path, tp: int = 1, tp_rank: int = 0) -> int:
        """Load checkpoint ``ck`` into this trainer: directly when it has this run's layout,
        else through :mod:`glm_runtime.training.reshard`."""
        meta = checkpoint.read_meta(ck)
        if "extra" in meta:  # before any weight is read: another model's shapes would not fit
            self._check_same_run(meta["extra"], ck)
        topo = getattr(self, "topo", None)
        rank, world = (topo.rank, topo.world_size) if topo is not None else (0, 1)
        if meta["world_size"] == world and meta["layout"] == self.layout:
            _, model_state, ts = checkpoint.load(ck, rank, world, self.layout)
            missing = set(self.master.names) - set(model_state)
            if missing:
                raise GLMError(f"checkpoint lacks {sorted(missing)[0]}", ck)
            self.master.load_state_dict(model_state)
            self.opt.load_state_dict(ts["optimizer"])
        else:
            ts = load_into(self, ck, meta, tp, tp_rank)
        self._check_same_run(ts.get("extra"), ck)
        self.scaler.load_state_dict(ts["scaler"])
        self.collator.load_state_dict(ts["data"])
        torch.set_rng_state(ts["torch_rng"])
        self.step = int(ts["step"])
        return self.step

    def _check_same_run(self, extra, ck: Path) -> None:
        if extra != self.extra_state:
            raise GLMError("the run directory's checkpoint was made with a different model/tokenizer config; "
                           "use a new run directory", ck)

    def save(self) -> Path:
        return checkpoint.save(self.ckpt_root, self.step, 0, 1, self.layout, self.master.state_dict(),
                               self._train_state(), keep=self.cfg.keep_checkpoints)

    def resume(self) -> int:
        """Load the newest complete checkpoint of the run directory, if any; returns its step.
        A checkpoint of another parallel layout is resharded (weights and AdamW moments)."""
        ck = checkpoint.latest(self.ckpt_root)
        return 0 if ck is None else self._restore(ck)

    # ----------------------------------------------------------------- loop
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        t0 = time.perf_counter()
        bs = batch_size_at(step, cfg.optim)
        dev = self.model.device
        micro = [self.collator.next_batch(cfg.optim.micro_batch_size).to(dev)
                 for _ in range(bs // cfg.optim.micro_batch_size)]
        n_targets = sum(b.n_targets for b in micro)
        scale = self.scaler.scale
        self.model.train()
        self.master.zero_grad()
        loss_value = 0.0
        for b in micro:
            w = b.n_targets / n_targets
            loss = batch_loss(self.model, b)
            (loss * (w * scale)).backward()
            loss_value += float(loss.detach()) * w
        total, norms = self.master.unscale_grads(scale)
        return self._apply_step(loss_value, total, norms.get("embed.weight", float("nan")), scale, micro, bs, t0)

    def _apply_step(self, loss_value: float, total: float, embed: float, scale: float, micro, bs: int,
                    t0: float) -> dict:
        """Clip and step (or skip the step on an inf/NaN, as the loss scaler asks), advance
        the scaler and the step counter; the step's log record."""
        cfg = self.cfg
        overflow = not (math.isfinite(total) and math.isfinite(loss_value))
        lr = lr_at(self.step, cfg.optim, cfg.steps)
        if not overflow:
            clip_grads(self.master.master, cfg.optim.clip_grad, total)
            set_lr(self.opt, lr)
            self.opt.step()
            self.master.copy_to_model()
        self.scaler.update(overflow)
        self.step += 1
        tokens = sum(b.n_tokens for b in micro)
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": loss_value, "grad_norm": total, "embed_grad_norm": embed,
                "loss_scale": scale, "lr": lr, "batch_size": bs, "tokens": tokens, "tokens_per_s": tokens / dt,
                "skipped": overflow}

    def fit(self, on_step: Callable[[dict], None] | None = None) -> list[dict]:
        cfg = self.cfg
        start = self.resume()
        log = RunLog(self.run_dir, start) if self.is_writer else None
        records = []
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not self.progress,
                   mininterval=1.0, dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                if self.make_eval_collator and ((cfg.eval_interval and self.step % cfg.eval_interval == 0)
                                                or self.step == cfg.steps):
                    ev = evaluate(self.model, self.make_eval_collator, cfg.eval_batches,
                                  cfg.optim.micro_batch_size)
                    rec.update(ev)
                if log:
                    log.write(_json_safe(rec))
                records.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", scale=rec["loss_scale"],
                                tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
                if on_step:
                    on_step(rec)
                if self.step % cfg.save_interval == 0 or self.step == cfg.steps:
                    self.save()
        finally:
            bar.close()
            if log:
                log.close()
        return records


def _json_safe(rec: dict) -> dict:
    """JSON has no inf/NaN: write them as strings so the log stays parseable."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
