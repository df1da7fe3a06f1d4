"""``glmrt export-onnx``: a checkpoint -> an ONNX directory the onnx backend runs."""
from __future__ import annotations

from torch.onnx._constants import ONNX_MAX_OPSET

from glm_runtime.converters import native
from glm_runtime.converters.onnx.export import DEFAULT_OPSET, export_checkpoint
from glm_runtime.converters.onnx.export_ops import FUSED_OPSET
from glm_runtime.converters.onnx.layout import MIN_OPSET
from glm_runtime.core.schema import arg_type, integer

from .common import show_progress

NAME = "export-onnx"
HELP = ("export a checkpoint to ONNX (one graph for prefill and decode, KV cache as inputs/outputs), "
        "checked against PyTorch; quantized linears run as onnxruntime's MatMulNBits")
EXAMPLE = "glmrt export-onnx ./chatglm2-native ./chatglm2-onnx   # then: glmrt generate ./chatglm2-onnx --backend onnx"


def add_arguments(p):
    p.add_argument("model", help="checkpoint directory (native or any supported format)")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantize first, with glmrt quantize's default scheme, and report the logit error against "
                        "the unquantized model; a quantized checkpoint exports as it is")
    p.add_argument("--opset", type=arg_type(integer(MIN_OPSET, ONNX_MAX_OPSET)), default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to {ONNX_MAX_OPSET} (what torch's exporter writes; default "
                   f"{DEFAULT_OPSET}: below {FUSED_OPSET} norms, rotary and attention are decomposed, slower)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    native.refuse_overlap(args.out, [args.model])
    r = export_checkpoint(args.model, args.out, opset=args.opset, quantize=args.quantize, overwrite=args.force,
                          progress=show_progress())
    size = sum(r["files"].values())
    print(f"{args.model} -> {args.out}: {r['family']}, opset {r['opset']}, {r['precision']}, "
          f"{size / 2**20:.1f} MiB; fp32 graph vs PyTorch max |logits diff| {r['max_abs_error_vs_torch']:.2g}")
    if "quantized" in r:
        q = r["quantized"]
        print(f"{r['precision']} vs fp32 over {q['positions']} positions: max |diff| {q['max_abs']:.3g} "
              f"({100 * q['max_rel']:.2f}% of max |logit| {q['max_abs_logit']:.3g}), mean |diff| "
              f"{q['mean_abs']:.3g}, top-1 agreement {100 * q['top1_agreement']:.1f}%")
    return 0
