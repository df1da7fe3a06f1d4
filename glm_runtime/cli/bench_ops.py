"""Op micro-benchmarks for ``glmrt doctor --bench``: achieved rates against the device's peak.

Sizes follow a 6B-class GLM layer (``size="6b"``: hidden 4096, 32 heads of 128, ffn 13696,
2 KV groups) with ``tokens`` tokens (``size="tiny"``: a smoke run of the same code); bytes and FLOPs are the op's compulsory traffic and arithmetic
(inputs read once, outputs written once), so the percentages are of what the hardware
could do at best. Timing: two warm-up calls, then the median of ``iters`` calls, each
fenced by ``Backend.synchronize()``.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch

from glm_runtime.core.ops.contract import Kernel
from glm_runtime.core.quant import quantize
from glm_runtime.core.registry import kernels_for


def median_time(fn, sync, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()``, each call fenced by ``sync()`` (the backend's
    ``synchronize``), after ``warmup`` calls: timing that works on every backend."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peaks(backend):
    caps = backend.capabilities()
    gbps = os.environ.get("GLM_PEAK_GBPS") or caps.extra.get("peak_gbps")
    tflops = os.environ.get("GLM_PEAK_TFLOPS") or caps.extra.get("peak_tflops_fp16")
    return (float(gbps) if gbps else None), (float(tflops) if tflops else None)


SIZES = {"6b": (4096, 32, 2, 128, 13696), "tiny": (256, 4, 2, 64, 512)}


def run_benchmarks(backend, dtype: torch.dtype, tokens: int = 2048, iters: int = 10, size: str = "6b") -> list[str]:
    dev = backend.device(0)
    ks: dict[str, Kernel] = kernels_for(backend)
    H, NH, G, D, F = SIZES[size]
    el = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    x = t(tokens, H)
    T = min(tokens, 2048)
    q, kk, v = t(1, NH, T, D), t(1, G, T, D), t(1, G, T, D)
    ang = torch.arange(T).float()[:, None] / 10000 ** (torch.arange(D // 4).float() / (D // 4))
    cos, sin = ang.cos()[None].to(dev, dtype), ang.sin()[None].to(dev, dtype)
    u = t(tokens, 2 * F)
    mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None]
    w8, s8 = quantize(torch.randn(F, H, generator=g) * 0.02, 8)
    w4, s4 = quantize(torch.randn(F, H, generator=g) * 0.02, 4)
    w8, s8, w4, s4 = w8.to(dev), s8.to(dev), w4.to(dev), s4.to(dev)
    w = t(2 * F, H, scale=0.02)
    one = t(1, H)
    cases = [  # (op, label, thunk, bytes, flops)
        ("rms_norm", f"[{tokens}x{H}]", lambda: ks["rms_norm"].fn(x, x[0], 1e-5), 2 * x.numel() * el, 0),
        ("layer_norm", f"[{tokens}x{H}]", lambda: ks["layer_norm"].fn(x, x[0], x[1], 1e-5), 2 * x.numel() * el, 0),
        ("rotary", f"q[1,{NH},{T},{D}] interleaved", lambda: ks["rotary"].fn(q, cos, sin, "interleaved"),
         2 * q.numel() * el, 0),
        ("glu", f"swiglu [{tokens}x{2 * F}]", lambda: ks["glu"].fn(u, "swiglu"), 1.5 * u.numel() * el, 0),
        ("attention", f"causal 1x{NH}x{T}x{D}, {G} KV groups",
         lambda: ks["attention"].fn(q, kk, v, mask, 1 / math.sqrt(D), None, 1.0),
         (2 * q.numel() + 2 * kk.numel()) * el, 2 * 2 * NH * T * T * D / 2),
        ("linear", f"[{tokens}x{H}] @ [{2 * F}x{H}]^T", lambda: ks["linear"].fn(x, w, None),
         (x.numel() + w.numel() + tokens * 2 * F) * el, 2 * tokens * H * 2 * F),
        ("quantized_linear", f"INT8 decode [1x{H}] @ [{F}x{H}]", lambda: ks["quantized_linear"].fn(one, w8, s8, None, 8),
         w8.numel(), 2 * H * F),
        ("quantized_linear", f"INT4 decode [1x{H}] @ [{F}x{H}]", lambda: ks["quantized_linear"].fn(one, w4, s4, None, 4),
         w4.numel(), 2 * H * F),
        ("quantized_linear", f"INT8 prefill [{tokens}x{H}]", lambda: ks["quantized_linear"].fn(x, w8, s8, None, 8),
         w8.numel() + (x.numel() + tokens * F) * el, 2 * tokens * H * F),
    ]
    peak_gbps, peak_tflops = _peaks(backend)
    out = [f"op benchmark on {backend.name} ({dev}), {str(dtype).replace('torch.', '')}, median of {iters}; "
           f"peak {peak_gbps or '?'} GB/s, {peak_tflops or '?'} TFLOP/s (fp16 dense)"]
    for op, label, fn, nbytes, flops in cases:
        k = ks.get(op)
        if k is None or not k.supports(dtype):
            out.append(f"  {op:<17} {label:<40} no kernel for {dtype} (reference fallback; not benchmarked)")
            continue
        sec = median_time(fn, backend.synchronize, 2, iters)
        gbs = nbytes / sec / 1e9
        tfl = flops / sec / 1e12
        parts = [f"{sec * 1e3:8.3f} ms", f"{gbs:8.3g} GB/s" + (f" ({gbs / peak_gbps:5.1%})" if peak_gbps else "")]
        if flops:
            parts.append(f"{tfl:8.3g} TFLOP/s" + (f" ({tfl / peak_tflops:5.1%})" if peak_tflops else ""))
        out.append(f"  {op:<17} {label:<40} " + "  ".join(parts))
    return out
