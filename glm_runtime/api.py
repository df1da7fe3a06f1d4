"""The Python API: ``load_model(path, backend=...)`` and the model object it returns.

    >>> from glm_runtime import load_model
    >>> m = load_model("path/to/checkpoint", backend="cpu")
    >>> logits = m(input_ids, attention_mask=mask)          # [B, T, V] float
    >>> out = m.generate(input_ids, max_new_tokens=32)      # [B, T + n] like transformers

``path`` is a native directory or any supported foreign checkpoint directory (the
format is detected). The runtime builds each family's own attention mask and position
ids from the ids; ``attention_mask`` is only the usual padding mask (1 = real token).

This module sits above everything it puts together: the converters read the checkpoint,
the core builds the model on the backend, and ``parallel`` shards it when the call is
one rank of a launched job.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.distributed as dist

from glm_runtime.converters.detect import load_checkpoint, open_parts
from glm_runtime.core.build import build_model, check_finite, check_finite_wanted, op_table, skeleton, storage_dtype
from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import GLMError
from glm_runtime.core.generation import SamplingConfig, generate
from glm_runtime.core.masks import prefill_inputs
from glm_runtime.core.model import GLMModel
from glm_runtime.core.registry import Backend, get_backend
from glm_runtime.core.sharding import local_part
from glm_runtime.parallel.bootstrap import current, under_launcher
from glm_runtime.parallel.model import ParallelModel
from glm_runtime.parallel.topology import get_topology, rank_of


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
            try:
                input_ids = torch.as_tensor(input_ids)
            except (ValueError, TypeError, RuntimeError, OverflowError) as e:  # ragged, beyond int64, not numbers
                raise GLMError(f"input_ids must be a [batch, length] array of token ids: {e}") from None
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise GLMError(f"input_ids must be integer token ids, got {input_ids.dtype}")
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


class ParallelGLM(GLM):
    """A :class:`GLM` whose model is one rank's part; calls are collective (every rank of
    the job must make the same call with the same inputs)."""

    def __init__(self, pmodel: ParallelModel, backend: Backend, tokenizer_path=None, source=None):
        super().__init__(pmodel, backend, tokenizer_path, source)
        self.topo = pmodel.topo

    def generate(self, input_ids, attention_mask=None, **kw):
        t = self.topo
        if kw.get("do_sample") and kw.get("seed") is None:  # every rank must draw the same samples
            seed = torch.randint(0, 2**62, (1,)) if t.rank == 0 else torch.zeros(1, dtype=torch.long)
            dist.broadcast(seed, src=0)
            kw["seed"] = int(seed)
        out = super().generate(input_ids, attention_mask, **kw)
        if t.dp > 1:  # replicas computed the same thing; make that a guarantee
            src = rank_of(t.pp_rank, 0, t.tp_rank, t.sizes)
            length = torch.tensor([out.shape[1]])
            dist.broadcast(length, src=src, group=t.dp_group)
            if int(length) != out.shape[1]:
                out = out.new_zeros(out.shape[0], int(length))
            dist.broadcast(out, src=src, group=t.dp_group)
        return out


def load_model(path: str | os.PathLike, backend: str | Backend | None = None, strict_ops: bool | None = None,
               progress: bool = False, tp: int = 1, pp: int = 1, dp: int | None = None,
               sat_args: str | None = None, **kwargs) -> GLM:
    """Load any supported checkpoint directory onto a backend (see the module docstring).

    ``backend`` follows the selection precedence (argument > GLM_BACKEND > auto).
    ``tp``/``pp``/``dp`` (or being started by a launcher such as mpirun, srun or torchrun)
    make this a collective call of every rank: see :func:`load_parallel`.
    ``sat_args`` describes a GLM-130B SAT checkpoint (its SAT model arguments, or a preset
    name), which carries no config of its own. Other keyword arguments go to the backend's
    own loader (:meth:`Backend.load_runtime`) on a backend that runs a graph of its own.
    """
    parallel = tp != 1 or pp != 1 or (dp or 1) != 1
    b = backend if isinstance(backend, Backend) else get_backend(backend, needs_graph=parallel)
    if parallel or (under_launcher() and not b.runs_own_graph):
        if kwargs or sat_args is not None:
            extra = sorted(kwargs) + (["sat_args"] if sat_args is not None else [])
            raise GLMError(f"load_model got unsupported option(s): {', '.join(extra)}")
        return load_parallel(path, b, tp=tp, pp=pp, dp=dp, strict_ops=strict_ops, progress=progress)
    if b.runs_own_graph:  # a graph of its own (an exported model): one process each
        if sat_args is not None:
            kwargs["sat_args"] = sat_args
        runner = b.load_runtime(path, strict_ops=strict_ops, progress=progress, **kwargs)
        return GLM(runner, b, runner.tokenizer_path, source=os.fspath(path))
    if kwargs:
        raise GLMError(f"load_model got unsupported option(s): {', '.join(sorted(kwargs))}")
    _, config, state, tok = load_checkpoint(path, progress=progress, sat_args=sat_args)
    model = build_model(config, state, b, strict_ops)
    return GLM(model, b, None if tok is None else str(tok), source=os.fspath(path))


def load_parallel(path, backend=None, tp: int = 1, pp: int = 1, dp: int | None = None, strict_ops=None,
                  progress: bool = False, ends_lighter: bool = False) -> ParallelGLM:
    """``load_model`` inside a launched job: bootstrap, shard, and the model object.

    Each rank builds its part of the graph on the meta device and reads only its parts of
    the weights (:func:`glm_runtime.converters.detect.open_parts`: slices of a native
    checkpoint's file; other formats are read whole, then cut), checks them for NaN/inf
    and gets a :class:`ParallelGLM` whose ``m(ids)`` returns the full logits and whose
    ``m.generate(...)`` returns the same tokens on every rank.
    """
    b = backend if isinstance(backend, Backend) else get_backend(backend, needs_graph=True)
    if b.runs_own_graph:
        raise GLMError(f"backend {b.name!r} runs an exported graph; tensor and pipeline parallelism need a "
                       "backend that runs the GLM graph")
    for name, v in (("tp", tp), ("pp", pp), ("dp", dp)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise GLMError(f"{name} must be a positive integer, got {v!r}")
    topo = get_topology(tp, pp, dp, b)
    ctx = current()
    ck = open_parts(path, progress=progress and topo.rank == 0)
    config = ck.config
    dtype = b.compute_dtype(storage_dtype(ck.tensors))
    pm = ParallelModel(skeleton(config, op_table(b, config, dtype, strict_ops), dtype), topo, ends_lighter)
    parts = {name: local_part(key, tuple(ck.tensors[key].shape), config, topo.tp, topo.tp_rank,
                              functools.partial(ck.read, key))
             for name, key in pm.checkpoint_keys().items()}
    if check_finite_wanted():
        check_finite(parts, path)
    pm.assign_parts(parts, dtype, b.device(ctx.info.local_rank), b.prepare_parameter).eval()
    return ParallelGLM(pm, b, None if ck.tokenizer is None else str(ck.tokenizer), source=os.fspath(path))
