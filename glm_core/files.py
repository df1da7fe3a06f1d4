"""Files the user names: small reads with a size limit, exclusive locks, output errors.

Every config the runtime reads (a checkpoint's ``config.json``, a shard index, a run or
training config, a training checkpoint's metadata) goes through :func:`read_text`: it is
small by nature, so a file over :data:`MAX_CONFIG_BYTES` (or a device such as
``/dev/zero`` behind a symlink) is refused after reading that much, instead of being read
until memory runs out; a directory, a missing or unreadable file and text that is not
UTF-8 are one-line errors naming the file.

:func:`exclusive_lock` is the one lock of the project: an ``flock`` on a file, held for
as long as the process needs it and released by the kernel when the process dies (so a
killed run never leaves a stale lock), with the holder's pid, host and command written
in the file for the one-line refusal a second process gets.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import GLMError

MAX_CONFIG_BYTES = 4 * 2**20


def read_text(path: str | os.PathLike, what: str = "config", limit: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a small file, or a one-line GLMError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise GLMError(f"{what} file not found", path) from None
    except IsADirectoryError:
        raise GLMError(f"{what} file is a directory", path) from None
    except OSError as e:
        raise GLMError(f"cannot read the {what} file ({e.strerror or e})", path) from None
    if len(data) > limit:
        raise GLMError(f"{what} file is larger than {limit // 2**20} MiB: not a {what} file", path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GLMError(f"{what} file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                       path) from None


def read_json(path: str | os.PathLike, what: str = "config", limit: int = MAX_CONFIG_BYTES):
    """The JSON value of a small file (see :func:`read_text`)."""
    text = read_text(path, what, limit)
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer literal beyond Python's digit limit
        raise GLMError(f"{what} file is not valid JSON ({str(e)[:200]})", path) from None
    except RecursionError:
        raise GLMError(f"{what} file is nested too deeply to be a {what}", path) from None


def describe_os_error(e: OSError) -> str:
    """``path: reason`` for an OSError, without Python's ``[Errno N]`` decoration."""
    reason = e.strerror or str(e) or type(e).__name__
    return f"{e.filename}: {reason}" if e.filename is not None else reason


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "output"):
    """Turn an OSError raised while writing ``path`` into a one-line GLMError naming it and
    the reason (read-only or full file system, no permission, a parent that is a file)."""
    try:
        yield
    except OSError as e:
        raise GLMError(f"cannot write the {what} ({e.strerror or e})", path) from None


def holder_line() -> str:
    """Who holds a lock: written into the lock file, read back by the one refused."""
    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    return (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f"{f' ({cmd})' if cmd else ''}")


def try_lock(path: str | os.PathLike) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if needed), or None when another
    process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str):
    """Hold an exclusive lock on ``path`` for the block; when another process holds it, a
    GLMError naming ``what`` and the holder (its pid, host, start time and command)."""
    path = Path(path)
    with writing(path, f"lock of the {what}"):
        fd = try_lock(path)
    if fd is None:
        try:
            holder = path.read_text().strip() or "another process"
        except OSError:
            holder = "another process"
        raise GLMError(f"{what} is in use by {holder} (lock {path.name}); wait for it to finish or use another "
                       "directory", path.parent)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (holder_line() + "\n").encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)
