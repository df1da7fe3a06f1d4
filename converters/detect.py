"""Recognise a checkpoint directory's format and read it into (GLMConfig, native state).

Formats are tried in order; each has a cheap ``is_*`` test on the directory's files and
a reader. Adding a format means adding one line to :data:`FORMATS`.
"""
from __future__ import annotations

import os
from pathlib import Path

from glm_core.errors import CheckpointError

from . import chatglm, hf, native

FORMATS = [
    ("native", native.is_native, lambda p, progress, **kw: native.load(p)),
    ("hf", hf.is_hf_glm, lambda p, progress, **kw: hf.read(p, progress=progress)),
    ("chatglm", chatglm.is_chatglm, lambda p, progress, **kw: chatglm.read(p, progress=progress)),
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
    raise CheckpointError("not a recognised GLM checkpoint (looked for a native config.json, or a transformers "
                          "glm/glm4 config.json)", path)


def load_checkpoint(path: str | os.PathLike, progress: bool = False):
    """(format name, GLMConfig, state dict, tokenizer file or None), checked against the config."""
    path = Path(path)
    fmt = detect_format(path)
    reader = next(r for name, _, r in FORMATS if name == fmt)
    config, state = reader(path, progress)
    native.check_state(config, state, path)
    tok = next((path / t for t in TOKENIZER_FILES if (path / t).is_file()), None)
    return fmt, config, state, tok
