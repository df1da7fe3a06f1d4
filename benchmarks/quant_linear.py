"""The quantized-linear op alone: fp32 F.linear vs the cpu backend's INT8 and INT4 kernels
vs the dequantise-then-matmul reference, on the four linears of one ChatGLM2-6B / GLM-4-9B
layer (hidden 4096, FFN 13696, 2 KV groups).

Decode is one token (M = 1): each call must stream the whole weight, so an ideal kernel's
time is set by the bytes read (fp32 4 B, INT8 1 B, INT4 0.5 B per weight); M = 16 is a
small batch. Times are the sum over the four linears of the minimum over --repeat calls
(robust on a shared machine). The last two columns run the same aten kernels with bf16
activations, their vectorised path; the cpu backend does not use it (its contract is fp32
compute: bf16 activations would add ~4e-3 relative error).

    python benchmarks/quant_linear.py [--threads 2] [--repeat 20]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from glm_runtime.backends.cpu.quant_kernels import _prepare, quantized_linear  # noqa: E402
from glm_runtime.core.ops.reference import quantized_linear as reference_quantized_linear  # noqa: E402
from glm_runtime.core.quant import quantize  # noqa: E402

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "fc1": (27392, 4096), "fc2": (4096, 13696)}


def best(fn, repeat):
    fn()
    t = float("inf")
    for _ in range(repeat):
        s = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - s)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(n, kk, generator=g) * 0.02 for k, (n, kk) in SHAPES.items()}
    quant = {b: {k: quantize(w, b) for k, w in weights.items()} for b in (8, 4)}
    print(f"one ChatGLM2-6B/GLM-4-9B layer's linears, {torch.get_num_threads()} threads, min of {a.repeat}")
    print(f"{'M':>4}  {'fp32':>8}  {'INT8':>8}  {'INT4':>8}  {'deq. ref INT4':>13}  {'|INT4 - ref|':>12}  "
          f"{'INT8 bf16-act':>13}  {'INT4 bf16-act':>13}   (ms)")
    for m in (1, 16):
        x = {k: torch.randn(m, kk, generator=g) for k, (_, kk) in SHAPES.items()}

        def total(fn, repeat=a.repeat):
            return 1e3 * sum(best(lambda k=k: fn(k), repeat) for k in SHAPES)

        t32 = total(lambda k: F.linear(x[k], weights[k]))
        t8 = total(lambda k: quantized_linear(x[k], *quant[8][k], None, 8))
        t4 = total(lambda k: quantized_linear(x[k], *quant[4][k], None, 4))
        tr = total(lambda k: reference_quantized_linear(x[k], *quant[4][k], None, 4), 2)
        err = max((quantized_linear(x[k], *quant[4][k], None, 4)
                   - reference_quantized_linear(x[k], *quant[4][k], None, 4)).abs().max().item() for k in SHAPES)
        xb = {k: v.bfloat16() for k, v in x.items()}
        t8b = total(lambda k: torch.ops.aten._weight_int8pack_mm(xb[k], quant[8][k][0], quant[8][k][1].bfloat16()))
        p4 = {k: _prepare(*quant[4][k], 4) for k in SHAPES}
        t4b = total(lambda k: torch.ops.aten._weight_int4pack_mm_for_cpu(xb[k], p4[k][1], p4[k][2],
                                                                         p4[k][3].bfloat16()))
        print(f"{m:>4}  {t32:>8.2f}  {t8:>8.2f}  {t4:>8.2f}  {tr:>13.2f}  {err:>12.2e}  {t8b:>13.2f}  {t4b:>13.2f}")
    mb = {b: sum(q.numel() * q.element_size() for q, _ in quant[b].values()) / 1e6 for b in (8, 4)}
    print(f"weight bytes: fp32 {sum(w.numel() * 4 for w in weights.values()) / 1e6:.0f} MB, INT8 {mb[8]:.0f} MB, "
          f"INT4 {mb[4]:.0f} MB")


if __name__ == "__main__":
    main()
