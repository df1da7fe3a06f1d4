"""Exports made on demand: any checkpoint directory runs on the onnx backend.

The onnx backend runs exported graphs. Given a checkpoint instead, it exports it once
(the export is checked against PyTorch before it is kept, as ``glmrt export-onnx`` does)
into a user cache directory and runs that; later loads of the same checkpoint find it.

* Key: the SHA-256 of the checkpoint's files (config, weights, tokenizer), the
  glm-runtime, torch, onnx and onnxruntime versions, the exporter's graph revision
  (:data:`~glm_runtime.converters.onnx.layout.GRAPH_REVISION`), and the export options. A changed
  weight file or an upgraded runtime gets a new export; an unchanged one is reused. The
  hash of a file is remembered by (path, size, mtime), so a load does not re-read
  gigabytes of weights to find its export.
* Where: ``$GLM_CACHE_DIR`` or ``$XDG_CACHE_HOME/glm-runtime`` or
  ``~/.cache/glm-runtime``, under ``onnx/``. Each export is written to a temporary
  directory and renamed into place, so a killed export leaves nothing half-written; two
  processes exporting the same checkpoint at once both end with the one export.
* Bypass: ``GLM_ONNX_CACHE=0`` (or ``load_model(..., cache=False)``) exports into a
  temporary directory that is removed when the process exits; ``glmrt cache --clear``
  empties the cache.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from glm_runtime.converters.detect import detect_format
from glm_runtime.converters.onnx.export import DEFAULT_OPSET, export_checkpoint
from glm_runtime.converters.onnx.layout import GRAPH, GRAPH_REVISION
from glm_runtime.core.errors import GLMError

log = logging.getLogger("glm_runtime.backends.onnx")
ENV_DIR, ENV_ENABLED = "GLM_CACHE_DIR", "GLM_ONNX_CACHE"
_HASH_INDEX = "file-hashes.json"


def cache_root() -> Path:
    base = os.environ.get(ENV_DIR) or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                  os.path.join(Path.home(), ".cache"), "glm-runtime")
    return Path(base) / "onnx"


def enabled() -> bool:
    return os.environ.get(ENV_ENABLED, "1").lower() not in ("0", "false", "no", "off")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _file_hash(f: Path, index: dict) -> str:
    st = f.stat()
    key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in index:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        index[key] = h.hexdigest()
    return index[key]


def export_key(checkpoint: Path, options: dict) -> str:
    """The cache key of ``checkpoint`` exported with ``options`` (module docstring)."""
    root = cache_root()
    index_file = root / _HASH_INDEX
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(checkpoint)}={_file_hash(f, index)}\n".encode())
    for dist in ("glm-runtime", "torch", "onnx", "onnxruntime"):
        h.update(f"{dist}={_version(dist)}\n".encode())
    h.update(f"graph={GRAPH_REVISION}\n".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    try:  # best effort: a read-only cache only costs re-hashing next time
        root.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        tmp.replace(index_file)
    except OSError:
        pass
    return h.hexdigest()[:32]


def exported(checkpoint: str | os.PathLike, progress: bool = False, cache: bool | None = None,
             sat_args: str | None = None) -> Path:
    """An export of ``checkpoint`` (any supported format), from the cache or made now."""
    src = Path(checkpoint)
    fmt = detect_format(src)  # a clear error for a path that is no checkpoint
    options = {"opset": DEFAULT_OPSET, "format": fmt, "sat_args": sat_args}
    use_cache = enabled() if cache is None else cache
    if not use_cache:
        out = Path(tempfile.mkdtemp(prefix="glm-onnx-")) / "export"
        atexit.register(shutil.rmtree, out.parent, True)
        log.info("exporting %s to ONNX into %s (cache disabled)", src, out)
        export_checkpoint(src, out, progress=progress, sat_args=sat_args)
        return out
    out = cache_root() / export_key(src, options)
    if (out / GRAPH).is_file():
        log.info("onnx backend: cached export of %s in %s", src, out)
        return out
    log.info("onnx backend: exporting %s once into the cache at %s", src, out)
    try:
        export_checkpoint(src, out, progress=progress, sat_args=sat_args)
    except GLMError:
        if (out / GRAPH).is_file():  # another process exported it at the same time
            return out
        raise
    return out


def clear() -> int:
    """Remove every cached export; returns how many there were."""
    root = cache_root()
    if not root.is_dir():
        return 0
    n = sum(1 for p in root.iterdir() if p.is_dir())
    shutil.rmtree(root)
    return n
