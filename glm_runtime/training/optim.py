"""Optimiser and schedules as GLM-130B used them (paper §2.3; GLM-10B DeepSpeed config).

AdamW with beta1 0.9, beta2 0.95, eps 1e-8, weight decay 0.1 (not on biases and norm
weights, as in Megatron); learning rate warmed up linearly and then decayed by a cosine to
10 % of its peak; batch size warmed up linearly from a small start (GLM-130B: 192 -> 4224
over the first 2.5 % of samples; here over ``batch_warmup_steps`` steps, rounded to whole
micro-batches); gradients clipped to a total L2 norm of 1.0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glm_runtime.core.errors import GLMError
from glm_runtime.core.schema import check_fields, integer, number, spec

_COUNT = integer(0, 2**31 - 1)


@dataclass
class OptimConfig:
    lr: float = spec(number(0, lo_open=True), 1e-3)
    min_lr_ratio: float = spec(number(0, 1), 0.1)
    warmup_steps: int = spec(_COUNT, 100)
    weight_decay: float = spec(number(0), 0.1)
    beta1: float = spec(number(0, 1, hi_open=True), 0.9)
    beta2: float = spec(number(0, 1, hi_open=True), 0.95)
    eps: float = spec(number(0, lo_open=True), 1e-8)
    clip_grad: float = spec(number(0), 1.0)  # 0: no clipping
    batch_size: int = spec(integer(1, 2**31 - 1), 8)  # global samples (rows) per step after warm-up
    micro_batch_size: int = spec(integer(1, 2**31 - 1), 8)
    batch_warmup_start: int | None = spec(integer(1, 2**31 - 1, optional=True), None)  # None: no batch warm-up
    batch_warmup_steps: int = spec(_COUNT, 0)

    def __post_init__(self):
        check_fields(self, "optim")
        if self.batch_size % self.micro_batch_size:
            raise GLMError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                           f"{self.micro_batch_size}")


def param_groups(named_params, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named_params:
        (no_decay if name.endswith(".bias") or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(named_params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(named_params, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then cosine to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def batch_size_at(step: int, cfg: OptimConfig) -> int:
    """Global batch (rows) of ``step``, a whole number of micro-batches."""
    if cfg.batch_warmup_start is None or step >= cfg.batch_warmup_steps:
        return cfg.batch_size
    bs = cfg.batch_warmup_start + (cfg.batch_size - cfg.batch_warmup_start) * step / cfg.batch_warmup_steps
    m = cfg.micro_batch_size
    return max(m, int(bs) // m * m)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def clip_grads(params, max_norm: float, total_norm: float) -> float:
    """Scale gradients so their total norm is at most ``max_norm``; returns the factor."""
    if max_norm <= 0 or total_norm <= max_norm:
        return 1.0
    f = max_norm / (total_norm + 1e-6)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(f)
    return f
