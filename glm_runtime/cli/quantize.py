"""``glmrt quantize``: write a weight-only INT8/INT4 native checkpoint."""
from __future__ import annotations

from glm_runtime.converters import native
from glm_runtime.converters.detect import load_checkpoint
from glm_runtime.converters.quantize import SCHEMES, quantize_scheme

from .common import show_progress

NAME = "quantize"
HELP = ("quantize a checkpoint's linear layers to INT8 or INT4 (GLM-130B scheme; INT4 with block-wise scales and an "
        "INT8 output projection by default) and save it as native")
EXAMPLE = "glmrt quantize ./chatglm-6b ./chatglm-6b-int4 --bits 4   # --scheme glm130b: the authors' exact scheme"


def add_arguments(p):
    p.add_argument("src", help="source checkpoint directory (any supported format)")
    p.add_argument("dst", help="output native directory (written atomically)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="8 or 4")
    p.add_argument("--scheme", choices=tuple(SCHEMES), default="fast",
                   help="fast (default): INT4 scales per block of 32 inputs and an INT8 output projection, what the "
                        "CPU fast path reads fastest and most accurately (docs/families.md has the figures); glm130b: "
                        "the authors' scheme, one scale per output row and a float output projection (what THUDM's "
                        "quantized ChatGLM files hold)")
    p.add_argument("--sat-args", default=None, help="for a SAT source: its model arguments or a preset name")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-check-weights", action="store_true", help="skip the NaN/inf check of the source weights")


def run(args) -> int:
    native.refuse_overlap(args.dst, [args.src])
    fmt, config, state, tok = load_checkpoint(args.src, progress=show_progress(), sat_args=args.sat_args,
                                              check_finite=not args.no_check_weights)
    qconfig, qstate = quantize_scheme(config, state, args.bits, args.scheme, progress=show_progress())
    native.save(args.dst, qconfig, qstate, tokenizer=tok, overwrite=args.force)
    size = sum(t.numel() * t.element_size() for t in qstate.values())
    print(f"{args.src} ({fmt}) -> {args.dst}: {config.family} INT{args.bits} ({args.scheme} scheme), "
          f"{size / 2**20:.1f} MiB")
    return 0
