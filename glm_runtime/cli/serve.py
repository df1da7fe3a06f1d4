"""``glmrt serve``: an OpenAI-compatible HTTP server for a model (docs/serving.md)."""
from __future__ import annotations

import os

from glm_runtime.core.errors import GLMError
from glm_runtime.core.schema import arg_type, integer
from glm_runtime.parallel.bootstrap import under_launcher
from glm_runtime.serving.load import EngineOptions, follow, open_model, served

from .common import RANKS, add_backend_args
from .generate import default_model

NAME = "serve"
HELP = "serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, tools, metrics)"
EXAMPLE = "glmrt serve ./glm-4-9b-chat --port 8000 --max-num-seqs 16 --api-key $KEY"
COUNT = arg_type(integer(1, 2**20))
PORT = arg_type(integer(0, 65535))  # 0: any free port


def add_engine_args(p) -> None:
    p.add_argument("--max-num-seqs", type=COUNT, default=8, help="sequences decoded together (KV memory: this many "
                   "times the context)")
    p.add_argument("--max-context", type=COUNT, default=None, help="positions per sequence, prompt and output "
                   "(default: the model's)")
    p.add_argument("--max-tokens-per-step", type=COUNT, default=512, help="tokens one iteration processes; a longer "
                   "prompt is prefilled in chunks")
    p.add_argument("--tp", type=RANKS, default=1, help="tensor-parallel ranks (run under a launcher)")
    p.add_argument("--pp", type=RANKS, default=1, help="pipeline-parallel stages (run under a launcher)")
    add_backend_args(p)


def engine_options(args) -> EngineOptions:
    return EngineOptions(args.max_num_seqs, args.max_context, args.max_tokens_per_step, args.max_queue)


def add_arguments(p):
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the bundled glm-tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--name", help="the model's name in the API (default: the directory's name)")
    p.add_argument("--api-key", default=os.environ.get("GLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (also GLM_API_KEY)")
    p.add_argument("--max-queue", type=COUNT, default=256, help="requests that may wait; more get HTTP 429")
    add_engine_args(p)


def run(args) -> int:
    try:  # optional dependencies (the serve extra)
        import uvicorn

        from glm_runtime.serving.server import create_app
    except ImportError as e:
        raise GLMError(f"glmrt serve needs the serve extra ({e.name} is missing): "
                       "pip install 'glm-runtime[serve]'") from None
    path = args.model or default_model()
    options = engine_options(args)
    if args.tp * args.pp > 1 or under_launcher():  # collective load; rank 0 serves, the others follow
        m = open_model(path, args.backend, args.tp, args.pp, args.strict_ops)
        if m.topo.rank != 0:
            follow(m, options)
            return 0
        app = create_app(lambda: served(m, args.name, options), args.api_key)
    else:
        app = create_app(lambda: served(open_model(path, args.backend, strict_ops=args.strict_ops), args.name,
                                        options), args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
