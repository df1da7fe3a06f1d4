"""Reading tensor files safely: safetensors, or torch pickles with ``weights_only=True``.

Nothing here executes code from a checkpoint. Every failure names the file.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import MISSING
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError, GLMError
from glm_runtime.core.files import read_json
from glm_runtime.core.schema import Rule


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError("weights file not found", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"not a readable safetensors file (truncated or corrupt?): {e}", path) from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsParts:
    """A safetensors file read one part of a tensor at a time (a rank's shard of it).

    :attr:`tensors` gives every tensor's shape and dtype as a meta tensor (no data);
    :meth:`read` copies out one slice. The file is opened (memory-mapped) for each read and
    closed after it: mapped pages that a read touched count in the process's resident
    memory for as long as the mapping lives, and a column slice touches every row of its
    tensor, so one mapping held for the whole load would make each rank's peak memory the
    file's size, which is what reading parts is for avoiding.
    """

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise CheckpointError("weights file not found", path)
        self.tensors: dict[str, torch.Tensor] = {}
        with self._open() as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                sl = h.get_slice(k)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{k} has dtype {sl.get_dtype()}, which no GLM weight has", path)
                self.tensors[k] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")

    def _open(self):
        try:
            return safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"not a readable safetensors file (truncated or corrupt?): {e}", self.path) from None

    def read(self, key: str, dim: int | None = None, start: int | None = None, stop: int | None = None):
        """Entries [start, stop) of tensor ``key`` along ``dim`` (``dim`` None: all of it)."""
        with self._open() as h:
            try:
                if dim is None:
                    return h.get_tensor(key)
                return h.get_slice(key)[(slice(None),) * dim + (slice(start, stop),)]
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"cannot read {key}: {e}", self.path) from None


def read_pickle(path: Path) -> dict:
    """torch.load with weights_only=True: plain tensors and containers only, no code."""
    if not path.is_file():
        raise CheckpointError("weights file not found", path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load: the pickle holds more than tensors ({str(e).splitlines()[0]})",
                              path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"not a readable torch checkpoint (truncated or corrupt?): {e}", path) from None


def read_config_json(directory: Path, required: bool = True) -> dict:
    """``directory/config.json`` as a dict. A missing file is ``{}`` with ``required=False``
    (format detection); a file that is there but unreadable, too large, not JSON or not a
    JSON object is always a one-line error naming it."""
    f = directory / "config.json"
    if not required and not os.path.lexists(f):
        return {}
    d = read_json(f, "config")
    if not isinstance(d, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {type(d).__name__}", f)
    return d


def config_value(hf: dict, key: str, rule: Rule, source, default=MISSING):
    """``hf[key]`` of a foreign config, checked by ``rule`` (the rule of the GLMConfig field
    it becomes) so that the error names the key as the file spells it; absent or null
    gives ``default``, and is an error without one."""
    value = hf.get(key)
    if value is None:
        if default is MISSING:
            raise CheckpointError(f"lacks field {key!r}", source)
        return default
    return rule.check(key, value, source)


def glm_config(source, **fields) -> GLMConfig:
    """GLMConfig(**fields) built from a foreign config: a refusal names ``source``."""
    try:
        return GLMConfig(**fields)
    except GLMError as e:
        raise CheckpointError(str(e), source) from None


def shard_files(directory: Path, stem: str, ext: str) -> list[Path]:
    """Files of a possibly sharded checkpoint: ``{stem}.{ext}`` or those listed in
    ``{stem}.{ext}.index.json``."""
    index = directory / f"{stem}.{ext}.index.json"
    if index.is_file():
        weight_map = read_json(index, "shard index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError("bad shard index: expected {\"weight_map\": {tensor: file, ...}}", index)
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
        if outside:
            raise CheckpointError(f"shard index names a file outside the checkpoint: {outside[0]}", index)
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"shard listed in the index is missing: {missing[0]}", index)
        return [directory / f for f in files]
    single = directory / f"{stem}.{ext}"
    return [single] if single.is_file() else []


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF-style directory: safetensors preferred, else .bin pickles."""
    files = shard_files(directory, "model", "safetensors")
    reader = read_safetensors
    if not files:
        files, reader = shard_files(directory, "pytorch_model", "bin"), read_pickle
    if not files:
        raise CheckpointError("no weights found (model.safetensors[.index.json] or pytorch_model.bin"
                              "[.index.json])", directory)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = reader(f)
        if not isinstance(part, dict):
            raise CheckpointError("expected a dict of tensors", f)
        out.update(part)
    return out

