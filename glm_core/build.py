"""Building a :class:`GLMModel` from a config and a state dict, on a backend.

The graph is instantiated on the meta device (no memory, no initialisation) and the
weights are then assigned into it, so a model costs exactly the memory of its weights.
Everything that builds a model goes through :func:`skeleton` and :func:`assign`: the
backends through :func:`build_model`, the ONNX exporter through :func:`reference_model`, a
rank of a parallel job with its own part of the weights only.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .config import GLMConfig
from .errors import CheckpointError, GLMError
from .model import GLMModel, Rotary, parameter_shapes
from .ops import OpTable
from .quant import keeps_stored_dtype
from .registry import Backend, kernels_for


def required_ops(config: GLMConfig) -> tuple[str, ...]:
    """The ops a model of this config calls at inference (strict mode checks only these)."""
    ops = ["embedding", "rotary", "attention",
           "quantized_linear" if config.quantization_bits else "linear",
           "rms_norm" if config.norm == "rmsnorm" else "layer_norm",
           "gelu_tanh" if config.activation == "gelu_tanh" else "glu",
           "quantized_linear" if config.lm_head_bits else "lm_head"]
    return tuple(dict.fromkeys(ops))


def op_table(backend: Backend, config: GLMConfig, dtype: torch.dtype, strict: bool | None) -> OpTable:
    """The ops of ``backend`` (its own kernels and those other plugins add) for ``config``."""
    return OpTable(backend.name, kernels_for(backend), dtype, strict=strict, required=required_ops(config))


def storage_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The float dtype a checkpoint's weights are stored in (fp32 when it has none)."""
    for k, v in state.items():
        if not keeps_stored_dtype(k, v):
            return v.dtype
    return torch.float32


def skeleton(config: GLMConfig, ops: OpTable, dtype: torch.dtype) -> GLMModel:
    """The graph of ``config`` on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return GLMModel(config, ops, dtype=dtype)


def assign(model: GLMModel, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
           prepare: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> GLMModel:
    """Put ``state`` (every key of ``model``'s state dict, checked) into a skeleton: float
    tensors cast to ``dtype``, all moved to ``device``, and ``prepare(key, tensor)`` giving
    each the layout its kernels want (:meth:`Backend.prepare_parameter`)."""
    placed = {}
    for k, v in state.items():
        v = v.to(device) if keeps_stored_dtype(k, v) else v.to(device=device, dtype=dtype)
        placed[k] = prepare(k, v) if prepare is not None else v
    model.load_state_dict(placed, strict=True, assign=True)
    model.rotary = Rotary(model.config, device=device)  # a non-persistent buffer: built on meta, not loaded
    return model


def materialize(config: GLMConfig, state: dict[str, torch.Tensor], ops: OpTable, dtype: torch.dtype,
                device: torch.device, prepare: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> GLMModel:
    """The graph of ``config`` on ``ops`` holding ``state``: :func:`assign` into a :func:`skeleton`."""
    return assign(skeleton(config, ops, dtype), state, dtype, device, prepare)


def build_model(config: GLMConfig, state: dict[str, torch.Tensor] | None, backend: Backend,
                strict_ops: bool | None = None, seed: int = 0, local_rank: int = 0,
                trainable: bool = False) -> GLMModel:
    """Instantiate the graph on ``backend``; random weights (std 0.02) when ``state`` is None.
    ``trainable`` keeps gradients on (training); otherwise the model is frozen in eval mode."""
    dtype = backend.compute_dtype(storage_dtype(state) if state else torch.float32)
    ops = op_table(backend, config, dtype, strict_ops)
    if state is None:
        state = random_state(config, seed)
    model = materialize(config, state, ops, dtype, backend.device(local_rank), backend.prepare_parameter)
    return model if trainable else model.eval().requires_grad_(False)


def reference_model(config: GLMConfig, state: dict[str, torch.Tensor]) -> GLMModel:
    """The graph on the op contract's reference ops with fp32 weights on the host: the
    definition of every op (what the ONNX exporter traces)."""
    ops = OpTable("reference", {}, torch.float32, strict=False)
    return materialize(config, state, ops, torch.float32, torch.device("cpu")).eval().requires_grad_(False)


CHECK_WEIGHTS_ENV = "GLM_CHECK_WEIGHTS"
_CHUNK = 1 << 24  # elements per isfinite pass: bounds the temporary mask at 16 MB whatever the tensor


def check_finite_wanted() -> bool:
    """Whether loads check the weights for NaN/inf: yes unless ``GLM_CHECK_WEIGHTS=0``
    (``glmrt generate --no-check-weights`` sets it; it reaches every rank of a launched job)."""
    return os.environ.get(CHECK_WEIGHTS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def check_finite(state: dict[str, torch.Tensor], source: str | os.PathLike | None = None) -> None:
    """Raise a one-line CheckpointError naming the first tensor that holds a NaN or an inf.

    One NaN in a weight turns every logit it reaches into NaN, and a model of NaN logits
    "generates" the argmax of NaNs (token 0, printed as garbage) with exit status 0; a
    cheap pass at load (a fraction of the time the file takes to read) makes that a
    refusal instead. Integer tensors (quantized weights) cannot hold either.
    """
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start:start + _CHUNK]
            ok = torch.isfinite(part)
            if not bool(ok.all()):
                bad = int((~ok).sum()) + sum(int((~torch.isfinite(flat[s:s + _CHUNK])).sum())
                                             for s in range(start + _CHUNK, flat.numel(), _CHUNK))
                first = float(part[~ok][0])
                raise CheckpointError(f"weights hold non-finite values: {name} has {bad} NaN/inf value(s) "
                                      f"(first: {first}); set {CHECK_WEIGHTS_ENV}=0 or pass --no-check-weights "
                                      "to load it anyway", source)


def random_state(config: GLMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights: normal(0, 0.02) matrices, unit norms, zero biases."""
    if config.quantization_bits:
        raise GLMError("random weights are made unquantized; quantize them afterwards")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, _) in sorted(parameter_shapes(config).items()):
        if k.endswith("norm.weight"):
            out[k] = torch.ones(shape)
        elif k.endswith(".bias"):
            out[k] = torch.zeros(shape)
        else:
            out[k] = torch.randn(shape, generator=g) * 0.02
    return out
