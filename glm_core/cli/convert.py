"""``glmrt convert``: any supported checkpoint -> native, or native -> another format."""
from __future__ import annotations

from ..errors import GLMError

NAME = "convert"
HELP = "convert a checkpoint directory to the native format (or, with --to, to another format)"
EXAMPLE = "glmrt convert ./glm-4-9b-hf ./glm-4-9b-native   |   glmrt convert ./native ./hf-out --to hf"

TARGETS = ("native", "hf")


def add_arguments(p):
    p.add_argument("src", help="source checkpoint directory (format detected)")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--to", default="native", choices=TARGETS, help="output format (default native)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    from converters import hf, native
    from converters.detect import load_checkpoint

    fmt, config, state, tok = load_checkpoint(args.src, progress=True)
    if args.to == "native":
        native.save(args.dst, config, state, tokenizer=tok, overwrite=args.force)
    elif args.to == "hf":
        hf.write(args.dst, config, state, overwrite=args.force, progress=True)
    else:  # argparse's choices make this unreachable from the CLI
        raise GLMError(f"unknown target format {args.to!r}")
    n = sum(t.numel() for t in state.values())
    print(f"{args.src} ({fmt}) -> {args.dst} ({args.to}): {config.family}, {len(state)} tensors, "
          f"{n / 1e6:.2f}M parameters")
    return 0
