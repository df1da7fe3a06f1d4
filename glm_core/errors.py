"""User-facing errors.

Every problem a user can cause (a bad path, a truncated file, a config that does not
match its weights, an unknown backend) is raised as a :class:`GLMError`. The CLI prints
it as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os


class GLMError(Exception):
    """An error caused by the user's input, printed by the CLI as a single line."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointError(GLMError):
    """A checkpoint file or directory is missing, corrupt, or does not match its config."""


class BackendError(GLMError):
    """A backend is unknown, unavailable, or does not provide a required op."""
