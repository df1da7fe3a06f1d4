"""Mixed precision: fp32 master weights and dynamic loss scaling (GLM-130B trained in FP16
with Apex O2: half-precision model, fp32 master copy, dynamic loss scale).

The model's parameters have the compute dtype (fp16, bf16 or fp32). For half dtypes an
fp32 master copy is what the optimiser updates; after each step it is copied back into
the model. The loss is multiplied by the scale before ``backward``; gradients are
unscaled into the master copy in fp32. If any gradient is inf/NaN (an fp16 overflow),
the step is skipped, the scale is multiplied by ``backoff_factor``, and training goes on;
after ``growth_interval`` clean steps in a row the scale grows by ``growth_factor``.
BF16 has fp32's exponent range and fp32 needs no scaling: both use a static scale of 1,
but a non-finite gradient still skips the step (and is logged) rather than poisoning
the weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glm_runtime.core.errors import GLMError
from glm_runtime.core.schema import check_fields, integer, number, spec

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ScalerConfig:
    init_scale: float = spec(number(0, lo_open=True), 2.0 ** 16)
    growth_factor: float = spec(number(1), 2.0)
    backoff_factor: float = spec(number(0, 1, lo_open=True, hi_open=True), 0.5)
    growth_interval: int = spec(integer(1, 2**31 - 1), 1000)
    min_scale: float = spec(number(0, lo_open=True), 1.0)

    def __post_init__(self):
        check_fields(self, "scaler")


class LossScaler:
    """Dynamic (fp16) or static loss scale with skip-on-overflow bookkeeping."""

    def __init__(self, dynamic: bool, config: ScalerConfig | None = None):
        self.dynamic = dynamic
        self.cfg = config or ScalerConfig()
        self.scale = float(self.cfg.init_scale) if dynamic else 1.0
        self.good_steps = 0
        self.skipped = 0

    def update(self, overflow: bool) -> None:
        """Call once per optimiser step with whether its gradients overflowed."""
        if overflow:
            self.skipped += 1
            self.good_steps = 0
            if self.dynamic:
                self.scale = max(self.cfg.min_scale, self.scale * self.cfg.backoff_factor)
            return
        self.good_steps += 1
        if self.dynamic and self.good_steps % self.cfg.growth_interval == 0:
            self.scale *= self.cfg.growth_factor

    def state_dict(self) -> dict:
        return {"dynamic": self.dynamic, "scale": self.scale, "good_steps": self.good_steps,
                "skipped": self.skipped}

    def load_state_dict(self, s: dict) -> None:
        if bool(s["dynamic"]) != self.dynamic:
            raise GLMError("the checkpoint was trained with a different precision (loss scaler kind differs)")
        self.scale, self.good_steps, self.skipped = float(s["scale"]), int(s["good_steps"]), int(s["skipped"])


class MasterWeights:
    """The parameters the optimiser updates: the model's own when they are fp32, else fp32
    copies that are written back into the half-precision model after every step."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]]):
        self.names = [n for n, _ in named_params]
        self.model = [p for _, p in named_params]
        self.copies = any(p.dtype != torch.float32 for p in self.model)
        if self.copies:
            self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model]
        else:
            self.master = self.model

    def named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(zip(self.names, self.master))

    def zero_grad(self) -> None:
        for p in self.model:
            p.grad = None
        if self.copies:
            for p in self.master:
                p.grad = None

    def unscale_grads(self, scale: float) -> tuple[float, dict[str, float]]:
        """Move gradients into the master params in fp32, divided by ``scale``.

        Returns (total L2 norm, {name: L2 norm}); a non-finite total means overflow.
        """
        inv = 1.0 / scale
        norms = {}
        total = 0.0
        for name, p, m in zip(self.names, self.model, self.master):
            if p.grad is None:
                continue
            if self.copies:
                g = p.grad.float().mul_(inv)  # .float() of a half tensor is a new tensor
            else:
                g = p.grad.mul_(inv) if inv != 1.0 else p.grad
            m.grad = g
            n = float(torch.linalg.vector_norm(g))
            norms[name] = n
            total += n * n
        return math.sqrt(total), norms

    def copy_to_model(self) -> None:
        if self.copies:
            with torch.no_grad():
                for p, m in zip(self.model, self.master):
                    p.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights by name (what a checkpoint stores)."""
        return {n: m.detach() for n, m in zip(self.names, self.master)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, m in zip(self.names, self.master):
                m.copy_(state[n])
        self.copy_to_model()
