"""The native checkpoint format: a directory with ``config.json`` (a GLMConfig plus a format
tag), ``model.safetensors`` and optionally ``tokenizer.model``.

Every output directory of the project (a converted or quantized checkpoint, an ONNX
export, a trained model, token shards) is written through :func:`atomic_dir`, the one
place where the rules of an output live: nothing half-written, one writer per
destination, no destination that contains or lies inside a source, stale temporaries of
dead writers removed, and an OSError as one line naming the destination.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError, GLMError
from glm_runtime.core.files import try_lock
from glm_runtime.core.model import parameter_shapes

from .tensor_io import SafetensorsParts, read_config_json, read_safetensors

FORMAT_TAG = "glm-runtime/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.model"
_TMP = ".tmp-"  # temporaries are ".<name>.tmp-<random>" beside their destination, each with a ".lock"


def is_native(path: Path) -> bool:
    return read_config_json(path, required=False).get("format") == FORMAT_TAG


def refuse_overlap(dst: str | os.PathLike, sources) -> None:
    """A one-line GLMError when ``dst`` is one of ``sources``, contains one (replacing it
    would delete the source) or lies inside one (the source would change under the reader)."""
    d = Path(os.path.realpath(dst))
    for src in sources:
        s = Path(os.path.realpath(src))
        if d == s or s.is_relative_to(d):
            raise GLMError(f"the output would replace the source {os.fspath(src)} (it is or contains it): "
                           "choose another output directory", dst)
        if d.is_relative_to(s):
            raise GLMError(f"the output lies inside the source {os.fspath(src)}: choose a directory outside it",
                           dst)


def remove_stale_temporaries(parent: Path) -> None:
    """Remove the temporaries of writers that died (killed, crashed, lost power) in
    ``parent``: a temporary whose lock nobody holds has no writer. A writer holds its lock
    (an flock, released by the kernel when the process dies) from before it creates its
    temporary until after it has removed it, so a live writer's files are never touched."""
    for lock in parent.glob(f".*{_TMP}*.lock"):
        try:
            fd = try_lock(lock)
        except OSError:
            continue
        if fd is None:
            continue
        try:
            stem = str(lock)[: -len(".lock")]
            _remove(Path(stem))
            _remove(Path(stem + ".old"))
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    """Remove a leftover directory tree, file or link, if there is one (best effort: a
    leftover is garbage, and failing to remove it must not fail the write)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or the file system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _install(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished temporary into place. Without ``overwrite`` a destination that
    appeared meanwhile (another writer finished first) is never replaced: rename(2) onto a
    non-empty directory fails. With it, an existing destination is swapped out atomically,
    so a reader sees the old or the new output, never none or a mix."""
    try:
        os.rename(tmp, dst)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        if not overwrite:
            raise GLMError("output appeared while this run was writing it (another writer finished first); "
                           "nothing was replaced (use --force to replace it)", dst) from None
    if _exchange(tmp, dst):
        return  # the previous output now sits at the temporary's path, which atomic_dir removes
    old = Path(str(tmp) + ".old")  # no atomic swap here: move the old output aside (a moment without one)
    os.rename(dst, old)
    os.rename(tmp, dst)
    _remove(old)


def _new_temporary(dst: Path) -> tuple[int, Path]:
    """(fd holding the lock, temporary directory) for a write of ``dst``. The lock file is
    made and locked before the directory exists, and re-made if a cleaner removed it in
    between (the lock would then guard a name nobody can see)."""
    while True:
        fd, lock = tempfile.mkstemp(prefix=f".{dst.name}{_TMP}", suffix=".lock", dir=dst.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            ours = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            ours = False
        if ours:
            tmp = Path(lock[: -len(".lock")])
            try:
                tmp.mkdir()
            except BaseException:
                os.close(fd)
                Path(lock).unlink(missing_ok=True)
                raise
            return fd, tmp
        os.close(fd)


def _is_output_path(filename, dst: Path) -> bool:
    """Whether an OSError's file is the output's: ``dst``, a directory on its way, or one of
    its temporaries (and not, say, a source file read while writing)."""
    if filename is None:
        return True
    p, d = Path(os.path.abspath(os.fsdecode(filename))), Path(os.path.abspath(dst))
    if d == p or d.is_relative_to(p):
        return True
    return any(q.parent == d.parent and q.name.startswith(f".{d.name}{_TMP}") for q in (p, *p.parents))


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes ``dst`` only if the block succeeds.

    The temporary is a sibling of ``dst`` (same file system: the final rename is atomic),
    guarded by a lock file held for the whole write; a writer that dies leaves both, and
    the next writer in that directory removes them (:func:`remove_stale_temporaries`).
    ``dst`` must not exist (or be empty) unless ``overwrite``; see :func:`_install` for the
    race with another writer. An OSError of the output (a read-only or full file system,
    no permission, a parent that is a file) is a one-line GLMError naming ``dst``.
    """
    dst = Path(dst)
    umask = os.umask(0)
    os.umask(umask)
    lock_fd, tmp = None, None
    try:
        exists = os.path.lexists(dst) and (not dst.is_dir() or dst.is_symlink() or any(dst.iterdir()))
        if exists and not overwrite:
            raise GLMError("output already exists (use --force to replace it)", dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dst.parent)
        lock_fd, tmp = _new_temporary(dst)
        os.chmod(tmp, 0o777 & ~umask)  # the output's mode, as any directory the user makes
        yield tmp
        # safetensors writes its files 0600 whatever the umask: a model converted by one
        # account would be unreadable to the serving account. Give files the umask's mode.
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        _install(tmp, dst, overwrite)
    except OSError as e:
        if not _is_output_path(e.filename, dst):
            raise  # a source read while writing: the caller's to report
        raise GLMError(f"cannot write the output ({e.strerror or e})", dst) from None
    finally:
        if tmp is not None:
            _remove(tmp)
            Path(str(tmp) + ".lock").unlink(missing_ok=True)
        if lock_fd is not None:
            os.close(lock_fd)


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


def read_config(path: str | os.PathLike) -> GLMConfig:
    path = Path(path)
    d = read_config_json(path)
    d.pop("format", None)
    return GLMConfig.from_dict(d, source=str(path / CONFIG))


def load(path: str | os.PathLike) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    return read_config(path), read_safetensors(Path(path) / WEIGHTS)


def open_parts(path: str | os.PathLike) -> tuple[GLMConfig, SafetensorsParts]:
    """The config and the weights as a file read part by part (see :class:`SafetensorsParts`)."""
    return read_config(path), SafetensorsParts(Path(path) / WEIGHTS)


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
