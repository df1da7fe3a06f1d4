"""``glmrt convert``: any supported checkpoint -> native, or native -> another format."""
from __future__ import annotations

from glm_runtime.converters import chatglm, hf, native, sat
from glm_runtime.converters.detect import load_checkpoint
from glm_runtime.core.errors import GLMError

from .common import RANKS, show_progress

NAME = "convert"
HELP = "convert a checkpoint directory to the native format (or, with --to, to another format)"
EXAMPLE = ("glmrt convert ./glm-4-9b-hf ./glm-4-9b-native   |   glmrt convert ./native ./hf-out --to hf   |   "
           "glmrt convert ./glm-130b-sat ./native --sat-args glm-130b   |   glmrt convert ./native ./sat4 --to sat --tp 4")

TARGETS = ("native", "hf", "chatglm", "sat")


def add_arguments(p):
    p.add_argument("src", help="source checkpoint directory (format detected)")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--to", default="native", choices=TARGETS, help="output format (default native)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-check-weights", action="store_true", help="skip the NaN/inf check of the source weights")
    p.add_argument("--sat-args", default=None, help="SAT source: its SAT model arguments "
                   "('--num-layers 70 --hidden-size 12288 ...') or a preset name (SAT files carry no config)")
    p.add_argument("--tp", type=RANKS, default=1, help="--to sat: number of tensor-parallel rank files (default 1)")


def run(args) -> int:
    native.refuse_overlap(args.dst, [args.src])
    fmt, config, state, tok = load_checkpoint(args.src, progress=show_progress(), sat_args=args.sat_args,
                                              check_finite=not args.no_check_weights)
    if args.to == "native":
        native.save(args.dst, config, state, tokenizer=tok, overwrite=args.force)
    elif args.to == "hf":
        hf.write(args.dst, config, state, overwrite=args.force, progress=show_progress())
    elif args.to == "chatglm":
        chatglm.write(args.dst, config, state, overwrite=args.force, progress=show_progress(), tokenizer=tok)
    elif args.to == "sat":
        sat.write(args.dst, config, state, tp=args.tp, overwrite=args.force, progress=show_progress())
        print(f"SAT files carry no config; load them with --sat-args '{sat.sat_args_for(config, args.tp)}'")
    else:  # argparse's choices make this unreachable from the CLI
        raise GLMError(f"unknown target format {args.to!r}")
    n = sum(t.numel() for t in state.values())
    print(f"{args.src} ({fmt}) -> {args.dst} ({args.to}): {config.family}, {len(state)} tensors, "
          f"{n / 1e6:.2f}M parameters")
    return 0
