"""The Python API: ``load_model(path, backend=...)`` and the model object it returns.

    >>> from glm_core import load_model
    >>> m = load_model("path/to/checkpoint", backend="cpu")
    >>> logits = m(input_ids, attention_mask=mask)          # [B, T, V] float
    >>> out = m.generate(input_ids, max_new_tokens=32)      # [B, T + n] like transformers

``path`` is a native directory or any supported foreign checkpoint directory (the
format is detected). The runtime builds each family's own attention mask and position
ids from the ids; ``attention_mask`` is only the usual padding mask (1 = real token).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .config import GLMConfig
from .errors import GLMError
from .generation import SamplingConfig, generate
from .masks import prefill_inputs
from .model import GLMModel, parameter_shapes
from .ops import OpTable
from .registry import Backend, get_backend
from .registry.selection import extra_kernels


def required_ops(config: GLMConfig) -> tuple[str, ...]:
    """The ops a model of this config calls at inference (strict mode checks only these)."""
    ops = ["embedding", "lm_head", "rotary", "attention",
           "quantized_linear" if config.quantization_bits else "linear",
           "rms_norm" if config.norm == "rmsnorm" else "layer_norm",
           "gelu_tanh" if config.activation == "gelu_tanh" else "glu"]
    return tuple(ops)


def build_op_table(backend: Backend, config: GLMConfig, dtype: torch.dtype, strict: bool | None) -> OpTable:
    kernels = {**backend.kernels(), **extra_kernels(backend.name)}
    return OpTable(backend.name, kernels, dtype, strict=strict, required=required_ops(config))


class GLM:
    """A loaded model on one backend: call it for logits, or ``generate``."""

    def __init__(self, model: GLMModel, backend: Backend, tokenizer_path: str | None = None,
                 source: str | None = None):
        self.model, self.backend = model, backend
        self.config: GLMConfig = model.config
        self.tokenizer_path = tokenizer_path
        self.source = source

    @property
    def device(self) -> torch.device:
        return self.model.device

    def op_report(self) -> str:
        return self.model.ops.format_report()

    def _check_ids(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise GLMError(f"input_ids must be a non-empty [batch, length] tensor, got shape {list(input_ids.shape)}")
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bool(bad.any()):
            raise GLMError(f"token id {int(input_ids[bad][0])} is outside the vocabulary "
                           f"(size {self.config.vocab_size})")
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask)
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
            if attention_mask.shape != input_ids.shape:
                raise GLMError(f"attention_mask shape {list(attention_mask.shape)} differs from input_ids "
                               f"shape {list(input_ids.shape)}")
            attention_mask = attention_mask.to(self.device)
        return input_ids.to(self.device, torch.long), attention_mask

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Float logits [B, T, V] (pad positions hold meaningless values)."""
        input_ids, attention_mask = self._check_ids(input_ids, attention_mask)
        pos, mask, _ = prefill_inputs(self.config, input_ids, attention_mask)
        return self.model(input_ids, pos, mask).float()

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_token_ids: list[int] | None = None, use_cache: bool = True,
                 streamer: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """[B, T + n] ids (n <= max_new_tokens); rows that stopped are padded with the pad id."""
        input_ids, attention_mask = self._check_ids(input_ids, attention_mask)
        if max_new_tokens < 1:
            raise GLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature <= 0:
            raise GLMError(f"temperature must be > 0, got {temperature}")
        s = SamplingConfig(max_new_tokens, do_sample, temperature, top_k, top_p, seed,
                           self.config.eos_token_ids if stop_token_ids is None else list(stop_token_ids))
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        return generate(self.model, input_ids, attention_mask, s, pad, use_cache=use_cache, stream=streamer)


def _place(state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> dict:
    """Cast float tensors to the compute dtype (int8 weights and fp16 scales stay)."""
    out = {}
    for k, v in state.items():
        keep = not v.is_floating_point() or k.endswith(".scale")
        out[k] = v.to(device) if keep else v.to(device=device, dtype=dtype)
    return out


def storage_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith(".scale"):
            return v.dtype
    return torch.float32


def build_model(config: GLMConfig, state: dict[str, torch.Tensor] | None, backend: Backend,
                strict_ops: bool | None = None, seed: int = 0, local_rank: int = 0,
                trainable: bool = False) -> GLMModel:
    """Instantiate the graph on ``backend``; random weights (std 0.02) when ``state`` is None.
    ``trainable`` keeps gradients on (training); otherwise the model is frozen in eval mode."""
    dtype = backend.compute_dtype(storage_dtype(state) if state else torch.float32)
    device = backend.device(local_rank)
    ops = build_op_table(backend, config, dtype, strict_ops)
    with torch.device("meta"):
        model = GLMModel(config, ops, quant_bits=config.quantization_bits, dtype=dtype)
    if state is None:
        state = random_state(config, seed)
    placed = {k: backend.prepare_parameter(k, v) for k, v in _place(state, dtype, device).items()}
    model.load_state_dict(placed, strict=True, assign=True)
    model.rotary = type(model.rotary)(config, device=device)  # its buffer was built on meta
    return model if trainable else model.eval().requires_grad_(False)


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


def load_model(path: str | os.PathLike, backend: str | Backend | None = None, strict_ops: bool | None = None,
               progress: bool = False, tp: int = 1, pp: int = 1, dp: int | None = None,
               sat_args: str | None = None, **kwargs) -> GLM:
    """Load any supported checkpoint directory onto a backend (see the module docstring).

    ``backend`` follows the selection precedence (argument > GLM_BACKEND > auto).
    ``tp``/``pp``/``dp`` (or being started by a launcher such as mpirun, srun or torchrun)
    make this a collective call of every rank: see :mod:`parallel.api`.
    ``sat_args`` describes a GLM-130B SAT checkpoint (its SAT model arguments, or a preset
    name), which carries no config of its own.
    """
    from converters.detect import load_checkpoint

    b = backend if isinstance(backend, Backend) else get_backend(backend)
    exported = getattr(b, "load_runtime", None) is not None  # runs its own graph: one process each
    if tp != 1 or pp != 1 or (dp or 1) != 1 or (_under_launcher() and not exported):
        if sat_args is not None:
            kwargs["sat_args"] = sat_args  # parallel loads read native/transformers checkpoints
        if kwargs:
            raise GLMError(f"load_model got unsupported option(s): {', '.join(sorted(kwargs))}")
        from parallel.api import load_parallel

        return load_parallel(path, b, tp=tp, pp=pp, dp=dp, strict_ops=strict_ops, progress=progress)
    # Optional backend capability: a backend that runs its own format (an exported graph)
    # provides ``load_runtime(path, strict_ops=, progress=, **options)`` returning an object
    # with GLMModel's forward signature, ``config``, ``ops`` and ``tokenizer_path``.
    load_runtime = getattr(b, "load_runtime", None)
    if load_runtime is not None:
        runner = load_runtime(path, strict_ops=strict_ops, progress=progress, **kwargs)
        return GLM(runner, b, runner.tokenizer_path, source=os.fspath(path))
    if kwargs:
        raise GLMError(f"load_model got unsupported option(s): {', '.join(sorted(kwargs))}")
    _, config, state, tok = load_checkpoint(path, progress=progress, sat_args=sat_args)
    model = build_model(config, state, b, strict_ops)
    return GLM(model, b, None if tok is None else str(tok), source=os.fspath(path))


def _under_launcher() -> bool:
    from parallel.bootstrap import under_launcher

    return under_launcher()
