"""``glmrt generate``: text (or ids) in, generated text out, streamed as it is decoded."""
from __future__ import annotations

import os
import sys

from glm_runtime.api import load_model
from glm_runtime.core.assets import default_model_dir
from glm_runtime.core.errors import GLMError
from glm_runtime.core.infilling import fill_blanks
from glm_runtime.core.registry import get_backend
from glm_runtime.core.tokenizer import Tokenizer

from .common import add_backend_args, read_run_config

NAME = "generate"
HELP = "generate text with a GLM model on the selected backend"
EXAMPLE = 'glmrt generate --prompt "The quick brown [MASK] jumps over the lazy dog." --backend cpu'


def default_model() -> str:
    return str(default_model_dir())


def add_arguments(p):
    p.add_argument("model", nargs="?", help="checkpoint directory (native or any supported format; "
                   "default: the bundled glm-tiny model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (may contain [MASK], [sMASK], [gMASK], <sop>)")
    src.add_argument("--ids", help="comma-separated prompt token ids instead of text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", type=int, nargs="*", help="stop token ids (default: the model's eos ids)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end only")
    p.add_argument("--ops", action="store_true", help="print the model's op report to stderr")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (run under a launcher: glmrt launch)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (run under a launcher)")
    add_backend_args(p)


def run(args) -> int:
    run_cfg = read_run_config(args.config)
    model_dir = args.model or run_cfg.get("model") or default_model()
    b = get_backend(args.backend, run_cfg.get("backend"), needs_graph=args.tp * args.pp > 1)
    m = load_model(model_dir, backend=b, strict_ops=args.strict_ops, tp=args.tp, pp=args.pp)
    if getattr(m, "topo", None) is not None and m.topo.rank != 0:  # every rank decodes; rank 0 prints
        sys.stdout = open(os.devnull, "w")
    if args.ops:
        print(m.op_report(), file=sys.stderr)
    tok = Tokenizer(m.tokenizer_path, m.config) if m.tokenizer_path else None
    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError:
            raise GLMError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    else:
        if tok is None:
            raise GLMError("the checkpoint has no tokenizer.model: pass --ids", model_dir)
        if args.prompt is None:
            raise GLMError("give --prompt TEXT or --ids 1,2,3")
        if m.config.attention == "prefix":  # blank infilling; a text without a blank gets [gMASK]

            print(fill_blanks(m, tok, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))
            return 0
        ids = tok.encode(args.prompt)
    if not ids:
        raise GLMError("the prompt encodes to no tokens")

    # Stream by decoding prompt + new ids and printing what was added: decoding the new ids
    # alone would lose the word boundaries sentencepiece marks on the first piece.
    seq = list(ids)
    printed = tok.decode(seq) if tok is not None else ""

    def stream(t):
        nonlocal printed
        seq.append(int(t[0]))
        if tok is not None and not args.no_stream:
            text = tok.decode(seq)
            sys.stdout.write(text[len(printed):] if text.startswith(printed) else text)
            sys.stdout.flush()
            printed = text

    if tok is not None and not args.no_stream:
        sys.stdout.write(printed)
    out = m.generate([ids], max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                     stop_token_ids=args.stop, streamer=stream)
    gen = out[0, len(ids):].tolist()
    if tok is None:
        print(",".join(str(i) for i in ids + gen))
    elif args.no_stream:
        print(tok.decode(ids + gen))
    else:
        print()
    return 0
