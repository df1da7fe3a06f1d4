"""Reading tensor files safely: safetensors, or torch pickles with ``weights_only=True``.

Nothing here executes code from a checkpoint. Every failure names the file.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from glm_runtime.core.errors import CheckpointError


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError("weights file not found", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"not a readable safetensors file (truncated or corrupt?): {e}", path) from None


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
    """``directory/config.json`` as a dict; with ``required=False`` a missing or invalid
    file is ``{}`` (format detection), otherwise a CheckpointError naming it."""
    f = directory / "config.json"
    try:
        d = json.loads(f.read_text())
    except FileNotFoundError:
        if required:
            raise CheckpointError("config.json not found", f) from None
        return {}
    except json.JSONDecodeError as e:
        if required:
            raise CheckpointError(f"not valid JSON ({e})", f) from None
        return {}
    return d if isinstance(d, dict) else {}


def shard_files(directory: Path, stem: str, ext: str) -> list[Path]:
    """Files of a possibly sharded checkpoint: ``{stem}.{ext}`` or those listed in
    ``{stem}.{ext}.index.json``."""
    index = directory / f"{stem}.{ext}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"bad shard index: {e}", index) from None
        files = sorted(set(weight_map.values()))
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

