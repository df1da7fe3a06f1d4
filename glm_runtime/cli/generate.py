"""``glmrt generate``: text (or ids) in, generated text out, streamed as it is decoded."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from glm_runtime.api import load_model
from glm_runtime.core.assets import default_model_dir
from glm_runtime.core.build import CHECK_WEIGHTS_ENV
from glm_runtime.core.errors import GLMError
from glm_runtime.core.infilling import fill_blanks
from glm_runtime.core.registry import get_backend
from glm_runtime.core.schema import arg_type, integer, number
from glm_runtime.core.tokenizer import Tokenizer

from .common import RANKS, add_backend_args, read_run_config, show_progress

NAME = "generate"
HELP = "generate text with a GLM model on the selected backend"
EXAMPLE = 'glmrt generate --prompt "The quick brown [MASK] jumps over the lazy dog." --backend cpu'


def default_model() -> str:
    return str(default_model_dir())


# What each sampling option may be: checked where it enters (argparse), with the value and
# the range in the message, before anything is loaded.
MAX_NEW_TOKENS = arg_type(integer(1, 2**31 - 1))
TEMPERATURE = arg_type(number(0, lo_open=True))
TOP_K = arg_type(integer(0, 2**31 - 1))  # 0: no top-k filtering
TOP_P = arg_type(number(0, 1, lo_open=True))  # 1: no nucleus filtering
SEED = arg_type(integer(0, 2**63 - 1))
TOKEN_ID = integer(0, 2**63 - 1)  # the vocabulary bound is the model's, checked once it is loaded


def token_ids(text: str) -> list[int]:
    """``--ids 5,6,7``: comma-separated token ids."""
    try:
        ids = [TOKEN_ID.check("", int(x)) for x in text.split(",") if x.strip()]
    except (ValueError, GLMError):
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: expected comma-separated token ids, each "
                                         f"{TOKEN_ID.expected().removeprefix('an integer ')}") from None
    if not ids:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one token id")
    return ids


@contextlib.contextmanager
def weights_check(wanted: bool):
    """``--no-check-weights`` for the load inside: load_model reads the check's switch from
    the environment (as every rank of a launched job does), restored afterwards."""
    old = os.environ.get(CHECK_WEIGHTS_ENV)
    if not wanted:
        os.environ[CHECK_WEIGHTS_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CHECK_WEIGHTS_ENV, None)
        else:
            os.environ[CHECK_WEIGHTS_ENV] = old


def add_arguments(p):
    p.add_argument("model", nargs="?", help="checkpoint directory (native or any supported format; "
                   "default: the bundled glm-tiny model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (may contain [MASK], [sMASK], [gMASK], <sop>)")
    src.add_argument("--ids", type=token_ids, help="comma-separated prompt token ids instead of text")
    p.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=TEMPERATURE, default=1.0, help="> 0 (with --do-sample)")
    p.add_argument("--top-k", type=TOP_K, default=0, help="keep the k most likely tokens; 0: all")
    p.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus sampling mass in (0, 1]; 1: all")
    p.add_argument("--seed", type=SEED, default=None)
    p.add_argument("--stop", type=arg_type(TOKEN_ID), nargs="*",
                   help="stop token ids (default: the model's eos ids)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end only")
    p.add_argument("--ops", action="store_true", help="print the model's op report to stderr")
    p.add_argument("--no-check-weights", action="store_true",
                   help=f"skip the NaN/inf check of the weights at load (also {CHECK_WEIGHTS_ENV}=0)")
    p.add_argument("--tp", type=RANKS, default=1, help="tensor-parallel ranks (run under a launcher: glmrt launch)")
    p.add_argument("--pp", type=RANKS, default=1, help="pipeline-parallel stages (run under a launcher)")
    add_backend_args(p)


def run(args) -> int:
    run_cfg = read_run_config(args.config)
    model_dir = args.model or run_cfg.model or default_model()
    b = get_backend(args.backend, run_cfg.backend, needs_graph=args.tp * args.pp > 1)
    with weights_check(not args.no_check_weights):
        m = load_model(model_dir, backend=b, strict_ops=args.strict_ops, tp=args.tp, pp=args.pp,
                       progress=show_progress())
    if getattr(m, "topo", None) is not None and m.topo.rank != 0:  # every rank decodes; rank 0 prints
        sys.stdout = open(os.devnull, "w")
    if args.ops:
        print(m.op_report(), file=sys.stderr)
    tok = Tokenizer(m.tokenizer_path, m.config) if m.tokenizer_path else None
    if args.ids is not None:
        ids = args.ids
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
