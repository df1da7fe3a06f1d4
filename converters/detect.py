"""Recognise a checkpoint directory's format and read it into (GLMConfig, native state).

Formats are tried in order; each has a cheap ``is_*`` test on the directory's files and
a reader. Adding a format means adding one line to :data:`FORMATS`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from glm_runtime.core.build import check_finite as check_finite_values
from glm_runtime.core.build import check_finite_wanted
from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError

from . import chatglm, hf, native, sat

FORMATS = [
    ("native", native.is_native, lambda p, progress, **kw: native.load(p)),
    ("hf", hf.is_hf_glm, lambda p, progress, **kw: hf.read(p, progress=progress)),
    ("chatglm", chatglm.is_chatglm, lambda p, progress, **kw: chatglm.read(p, progress=progress)),
    ("sat", sat.is_sat, lambda p, progress, sat_args=None: sat.read(p, sat_args, progress=progress)),
]
TOKENIZER_FILES = (native.TOKENIZER, "ice_text.model")  # ChatGLM-6B names its sentencepiece model so


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file or directory", path)
    if not path.is_dir():
        raise CheckpointError("a checkpoint is a directory (native, transformers ...), this is a file", path)
    for name, test, _ in FORMATS:
        if test(path):
            return name
    if (path / "model.onnx").is_file():
        raise CheckpointError("this is an ONNX export: run it with the onnx backend (--backend onnx)", path)
    raise CheckpointError("not a recognised GLM checkpoint (looked for a native, transformers glm/glm4 or THUDM "
                          "chatglm config.json, or a SAT 'latest' + mp_rank_XX_model_states.pt layout)", path)


def load_checkpoint(path: str | os.PathLike, progress: bool = False, sat_args: str | None = None,
                    check_finite: bool | None = None):
    """(format name, GLMConfig, state dict, tokenizer file or None), checked against the config.

    ``sat_args`` (SAT model arguments or a preset name) describes a SAT checkpoint, which
    has no config file; it is an error for any other format. ``check_finite`` refuses
    weights that hold a NaN or an inf (:func:`glm_runtime.core.build.check_finite`); None
    means yes unless ``GLM_CHECK_WEIGHTS=0``."""
    path = Path(path)
    fmt = detect_format(path)
    reader = next(r for name, _, r in FORMATS if name == fmt)
    if sat_args is not None and fmt != "sat":
        raise CheckpointError(f"--sat-args given, but this is a {fmt} checkpoint (it has its own config)", path)
    config, state = reader(path, progress, **({"sat_args": sat_args} if fmt == "sat" else {}))
    native.check_state(config, state, path)
    if check_finite_wanted() if check_finite is None else check_finite:
        check_finite_values(state, path)
    return fmt, config, state, _tokenizer(path)


def _tokenizer(path: Path) -> Path | None:
    return next((path / t for t in TOKENIZER_FILES if (path / t).is_file()), None)


@dataclass
class Parts:
    """A checkpoint opened for reading parts of its tensors (a rank's shards)."""

    format: str
    config: GLMConfig
    tensors: dict[str, torch.Tensor]
    """Every tensor's shape and dtype (meta tensors where the data is not read yet)."""
    read: Callable[[str, int | None, int | None, int | None], torch.Tensor]
    """``read(key, dim, start, stop)``: entries [start, stop) along ``dim`` (None: all)."""
    tokenizer: Path | None


def open_parts(path: str | os.PathLike, progress: bool = False) -> Parts:
    """Open a checkpoint so that a caller reads only the parts of tensors it keeps.

    A native checkpoint is read straight from its safetensors file, slice by slice, so a
    rank of a tensor-parallel job never holds more than its shards. Other formats are
    converted on reading (fused and renamed tensors), so they are read whole first and
    then cut: convert them to the native format once to load them in parts. Weights are
    not checked for NaN/inf here: the caller checks the parts it reads."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "native":
        config, file = native.open_parts(path)
        native.check_state(config, file.tensors, path)
        return Parts(fmt, config, file.tensors, file.read, _tokenizer(path))
    _, config, state, tok = load_checkpoint(path, progress=progress, check_finite=False)

    def read(key, dim=None, start=None, stop=None):
        return state[key] if dim is None else state[key].narrow(dim, start, stop - start)
    return Parts(fmt, config, state, read, tok)
