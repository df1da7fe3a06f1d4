"""Opening a model for serving: the loaded model, its tokenizer and an engine over it.

Shared by ``glmrt serve`` and ``glmrt chat``. The backend must run the GLM graph (the
engine decodes sequences at different positions in one step); under a launcher the
model is one rank's part and rank 0's engine broadcasts its plans (:mod:`.ranks`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from glm_runtime.api import GLM, load_model
from glm_runtime.core.chat import chat_format
from glm_runtime.core.errors import GLMError
from glm_runtime.core.registry import get_backend
from glm_runtime.core.tokenizer import Tokenizer
from glm_runtime.parallel import bootstrap

from . import ranks
from .engine import Engine


@dataclass
class Served:
    """What is served: the engine over a model, the model's config and tokenizer, its name."""

    name: str
    engine: Engine
    config: object
    tokenizer: Tokenizer | None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> str | None:
        """The model's chat format (None: a base model)."""
        try:
            return chat_format(self.config)
        except GLMError:
            return None


@dataclass
class EngineOptions:
    max_num_seqs: int = 8
    max_context: int | None = None
    max_tokens_per_step: int = 512
    max_queue: int = 256


def open_model(path: str | os.PathLike, backend: str | None, tp: int = 1, pp: int = 1,
               strict_ops: bool | None = None) -> GLM:
    b = get_backend(backend, needs_graph=True)
    return load_model(path, backend=b, strict_ops=strict_ops, tp=tp, pp=pp)


def served(m: GLM, name: str | None, options: EngineOptions) -> Served:
    """The engine over ``m`` (rank 0's, under a launcher: it broadcasts its plans)."""
    parallel = getattr(m, "topo", None) is not None
    on_fatal = None
    if parallel:
        def on_fatal(e: Exception):
            with bootstrap.fail_fast("serving"):  # one line and exit on every rank, never a hang
                raise e
    engine = Engine(m.model, m.config, options.max_num_seqs, options.max_context, options.max_tokens_per_step,
                    options.max_queue, broadcast=ranks.broadcaster() if parallel else None, on_fatal=on_fatal)
    tok = Tokenizer(m.tokenizer_path, m.config) if m.tokenizer_path else None
    return Served(name or Path(m.source or "model").name, engine, m.config, tok)


def follow(m: GLM, options: EngineOptions) -> None:
    """A rank other than 0: run rank 0's plans until the server stops."""
    max_context = min(options.max_context or m.config.max_position_embeddings, m.config.max_position_embeddings)
    with bootstrap.fail_fast("serving"):
        ranks.follow(m.model, m.config, options.max_num_seqs, max_context)
