"""The native checkpoint format: a directory with ``config.json`` (a GLMConfig plus a format
tag), ``model.safetensors`` and optionally ``tokenizer.model``.

Writes are atomic: everything goes to a temporary sibling directory that is renamed
into place at the end, so an interrupted conversion leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError, GLMError
from glm_runtime.core.model import parameter_shapes

from .tensor_io import read_safetensors

FORMAT_TAG = "glm-runtime/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.model"


def is_native(path: Path) -> bool:
    cfg = path / CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT_TAG
    except (json.JSONDecodeError, AttributeError):
        return False


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that replaces ``dst`` only if the block succeeds."""
    dst = Path(dst)
    if (dst.is_dir() and any(dst.iterdir())) or dst.is_file():
        if not overwrite:
            raise GLMError("output already exists (use --force to replace it)", dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        # safetensors writes its files 0600 whatever the umask: a model converted by one
        # account would be unreadable to the serving account. Give files the umask's mode.
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_native(directory: Path, config: GLMConfig, state: dict[str, torch.Tensor],
                 tokenizer: str | os.PathLike | None = None) -> None:
    """Write into an existing (temporary) directory; see :func:`save` for the atomic wrapper."""
    d = config.to_dict()
    d["format"] = FORMAT_TAG
    (directory / CONFIG).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS),
              metadata={"format": "pt", "glm_runtime": FORMAT_TAG})
    if tokenizer is not None:
        shutil.copyfile(tokenizer, directory / TOKENIZER)


def save(dst: str | os.PathLike, config: GLMConfig, state: dict[str, torch.Tensor],
         tokenizer: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    with atomic_dir(dst, overwrite) as tmp:
        write_native(tmp, config, state, tokenizer)
    return Path(dst)


def load(path: str | os.PathLike) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    d = json.loads((path / CONFIG).read_text())
    d.pop("format", None)
    config = GLMConfig.from_dict(d, source=str(path / CONFIG))
    state = read_safetensors(path / WEIGHTS)
    return config, state


def check_state(config: GLMConfig, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise a one-line CheckpointError when keys or shapes do not match the config."""
    exp = parameter_shapes(config)
    missing = sorted(set(exp) - set(state))
    if missing:
        raise CheckpointError(f"weights do not match the config: missing {missing[0]}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}", source)
    extra = sorted(set(state) - set(exp))
    if extra:
        raise CheckpointError(f"weights do not match the config: unexpected key {extra[0]}"
                              f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}", source)
    for k, (shape, dtype) in exp.items():
        t = state[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"weights do not match the config: {k} has shape {list(t.shape)}, "
                                  f"the config implies {list(shape)}", source)
        if dtype is not None and t.dtype != dtype:
            raise CheckpointError(f"{k} has dtype {t.dtype}, expected {dtype}", source)
        if dtype is None and not t.is_floating_point():
            raise CheckpointError(f"{k} has dtype {t.dtype}, expected a float tensor", source)
