"""The op grid and the elementwise check against the reference ops.

A case builds its inputs in fp32 from a seeded generator, rounds the floating ones to the
dtype under test and moves them to the device; the reference then runs in fp32 on the
same rounded values (on the host) and the kernel's output must satisfy, elementwise,
``|out - ref| <= atol + rtol * |ref|`` with ``(atol, rtol)`` from
:data:`glm_runtime.core.ops.contract.TOLERANCES` for the output dtype. Output dtype and shape
must match what the reference returns for inputs of that dtype.

Shapes are small on purpose (the kit also runs kernels in interpreters) but chosen to
break wrong index arithmetic: odd and non-power-of-two sizes, head size 20/24, rotated
width smaller than the head, grouped KV heads 2:1 and 4:1, left padding, a prefix
(bidirectional context) and decode steps with a longer key sequence than queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from glm_runtime.core.ops.contract import OPS, quantized_linear_slack, tolerance
from glm_runtime.core.quant import quantize

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    make: Callable  # (gen) -> (args tuple, kwargs dict), fp32 / int / bool tensors on the host

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}"


@dataclass
class CheckResult:
    case: str
    dtype: torch.dtype
    ok: bool
    detail: str


def _rn(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g) * scale + shift


def _angles(g, B, T, n):
    pos = torch.randint(0, 64, (B, T), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(n).float() / n))
    ang = pos[..., None] * inv
    return ang.cos(), ang.sin()


def _heads(g, B, T, H, d):
    """[B, H, T, d] as the model passes it: a transposed view of [B, T, H, d]."""
    return _rn(g, B, T, H, d).transpose(1, 2)


def _prefix_mask(B, T, pads, ctxs):
    """GLM blank-infilling mask with left padding, as glm_runtime.core.masks builds it."""
    m = torch.zeros(B, T, T, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(pads, ctxs)):
        r = torch.arange(T - p)
        m[b, p:, p:] = (r[None, :] < c) | (r[None, :] <= r[:, None])
    m |= torch.eye(T, dtype=torch.bool)
    return m[:, None]


def _causal_offset_mask(B, Tq, Tk, pads):
    """Queries are the last Tq of Tk positions (a chunk after a cached prefix)."""
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    m = (j <= i).expand(B, Tq, Tk).clone()
    for b, p in enumerate(pads):
        m[b, :, :p] = False
    return m[:, None]


def _attn(g, B, nh, gkv, Tq, Tk, d, mask, scale=None, mask_value=None, layer_scale=1.0):
    q, k, v = _heads(g, B, Tq, nh, d), _heads(g, B, Tk, gkv, d), _heads(g, B, Tk, gkv, d)
    return (q, k, v, mask, 1.0 / math.sqrt(d) if scale is None else scale, mask_value, layer_scale), {}


def _qlin(g, M, K, N, bits, bias, block=None):
    qw, sc = quantize(_rn(g, N, K), bits, block)
    return (_rn(g, *M, K), qw, sc, _rn(g, N) if bias else None, bits), {}


def _rot(g, layout, d, n):
    c, s = _angles(g, 2, 7, n)
    return (_heads(g, 2, 7, 3, d), c, s, layout), {}


def _ce(g):
    t = torch.randint(0, 37, (2, 5), generator=g)
    t[0, 1] = t[1, 4] = -100
    return (_rn(g, 2, 5, 37, scale=2.0), t), {}


CASES: list[Case] = [
    Case("embedding", "2x7-v37", lambda g: ((torch.randint(0, 37, (2, 7), generator=g), _rn(g, 37, 24)), {})),
    Case("linear", "bias-3d", lambda g: ((_rn(g, 2, 5, 24), _rn(g, 40, 24, scale=0.2), _rn(g, 40)), {})),
    Case("linear", "nobias-odd", lambda g: ((_rn(g, 3, 33), _rn(g, 17, 33, scale=0.2), None), {})),
    Case("lm_head", "v37", lambda g: ((_rn(g, 2, 3, 24), _rn(g, 37, 24, scale=0.2)), {})),
    Case("quantized_linear", "int8-bias", lambda g: _qlin(g, (2, 5), 48, 40, 8, True)),
    Case("quantized_linear", "int8-decode", lambda g: _qlin(g, (1, 1), 48, 40, 8, False)),
    Case("quantized_linear", "int4-bias", lambda g: _qlin(g, (2, 5), 48, 40, 4, True)),
    Case("quantized_linear", "int4-odd-n", lambda g: _qlin(g, (3,), 96, 19, 4, False)),
    Case("quantized_linear", "int4-block32", lambda g: _qlin(g, (2, 3), 96, 48, 4, True, 32)),
    Case("quantized_linear", "int4-block64-decode", lambda g: _qlin(g, (1, 1), 128, 32, 4, False, 64)),
    Case("quantized_linear", "int4-block32-odd-n", lambda g: _qlin(g, (3,), 64, 19, 4, False, 32)),
    Case("quantized_linear", "int8-head-prefill", lambda g: _qlin(g, (1, 40), 64, 160, 8, False)),
    Case("layer_norm", "bias", lambda g: ((_rn(g, 2, 5, 24, scale=2, shift=0.3), _rn(g, 24, scale=0.5, shift=1),
                                           _rn(g, 24), 1e-5), {})),
    Case("layer_norm", "nobias-100", lambda g: ((_rn(g, 3, 100, scale=2, shift=-0.7), _rn(g, 100, scale=0.5, shift=1),
                                                None, 1e-5), {})),
    Case("rms_norm", "24", lambda g: ((_rn(g, 2, 5, 24, scale=2, shift=0.3), _rn(g, 24, scale=0.5, shift=1), 1e-5),
                                      {})),
    Case("rms_norm", "100-eps6", lambda g: ((_rn(g, 3, 100, scale=2), _rn(g, 100, scale=0.5, shift=1), 1e-6), {})),
    Case("rotary", "neox-full", lambda g: _rot(g, "neox", 24, 12)),
    Case("rotary", "neox-partial", lambda g: _rot(g, "neox", 24, 8)),
    Case("rotary", "neox_2d", lambda g: _rot(g, "neox_2d", 24, 12)),
    Case("rotary", "interleaved-partial", lambda g: _rot(g, "interleaved", 24, 6)),
    Case("rotary", "interleaved-full", lambda g: _rot(g, "interleaved", 20, 10)),
    Case("attention", "mha-nomask", lambda g: _attn(g, 2, 4, 4, 9, 9, 24, None)),
    Case("attention", "gqa2-causal", lambda g: _attn(g, 2, 4, 2, 9, 9, 24, _causal_offset_mask(2, 9, 9, [0, 0]))),
    Case("attention", "gqa4-prefix-pad", lambda g: _attn(g, 2, 4, 1, 13, 13, 24,
                                                         _prefix_mask(2, 13, pads=[0, 3], ctxs=[6, 4]))),
    Case("attention", "prefix-maskvalue-layerscale", lambda g: _attn(
        g, 2, 2, 2, 11, 11, 20, _prefix_mask(2, 11, pads=[2, 0], ctxs=[5, 11]), mask_value=-10000.0,
        layer_scale=3.0)),
    Case("attention", "decode-pad", lambda g: _attn(g, 2, 4, 2, 1, 11, 24,
                                                    _causal_offset_mask(2, 1, 11, pads=[0, 4]))),
    Case("attention", "chunk-after-cache", lambda g: _attn(g, 2, 4, 2, 4, 10, 24,
                                                           _causal_offset_mask(2, 4, 10, pads=[1, 0]))),
    Case("glu", "swiglu", lambda g: ((_rn(g, 2, 5, 40, scale=2), "swiglu"), {})),
    Case("glu", "geglu", lambda g: ((_rn(g, 2, 5, 40, scale=2), "geglu"), {})),
    Case("glu", "swiglu-odd", lambda g: ((_rn(g, 3, 66, scale=2), "swiglu"), {})),
    Case("gelu_tanh", "30", lambda g: ((_rn(g, 2, 5, 30, scale=2), ), {})),
    Case("cross_entropy", "ignore", lambda g: _ce(g)),
]


def _out_dtype(op: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the contract's op returns for inputs of ``dtype`` (the loss is always fp32)."""
    return torch.float32 if op == "cross_entropy" else dtype


def _prepare(case: Case, dtype: torch.dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    args, kwargs = case.make(g)

    def cast(a):
        if isinstance(a, torch.Tensor) and a.dtype in FLOATS:
            if case.op == "quantized_linear" and a.dtype == torch.float16:
                return a  # the fp16 scale is storage, not compute dtype
            return a.to(dtype)
        return a

    typed = tuple(cast(a) for a in args)
    ref_args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in FLOATS else a for a in typed)
    dev_args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in typed)
    return dev_args, ref_args, kwargs


def check(fn: Callable, case: Case, dtype: torch.dtype, device="cpu", seed: int = 0) -> CheckResult:
    """Run ``fn`` (a kernel for ``case.op``) on the case's inputs and compare to the reference."""
    dev_args, ref_args, kwargs = _prepare(case, dtype, device, seed)
    ref = OPS[case.op].reference(*ref_args, **kwargs).float()
    try:
        out = fn(*dev_args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with its cause
        return CheckResult(case.id, dtype, False, f"raised {type(e).__name__}: {e}")
    want = _out_dtype(case.op, dtype)
    if not isinstance(out, torch.Tensor):
        return CheckResult(case.id, dtype, False, f"returned {type(out).__name__}, not a tensor")
    if out.dtype != want or tuple(out.shape) != tuple(ref.shape):
        return CheckResult(case.id, dtype, False, f"returned {out.dtype} {tuple(out.shape)}, contract says "
                                                  f"{want} {tuple(ref.shape)}")
    atol, rtol = tolerance(want)
    o = out.detach().float().cpu()
    err = (o - ref).abs()
    bound = atol + rtol * ref.abs()
    if case.op == "quantized_linear":  # activations may be rounded to 8 bits (the contract's docstring)
        bound = bound + quantized_linear_slack(*ref_args[:3], ref_args[4])
    bad = ~(err <= bound)  # NaN counts as bad
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return CheckResult(case.id, dtype, False,
                           f"{int(bad.sum())}/{bad.numel()} elements out of tolerance (atol {atol}, rtol {rtol}); "
                           f"first at {idx}: got {o[idx].item():.6g}, reference {ref[idx].item():.6g}")
    ratio = float((err / bound).max()) if err.numel() else 0.0
    return CheckResult(case.id, dtype, True, f"max |err| {float(err.max()) if err.numel() else 0:.3g} "
                                             f"({ratio:.0%} of the tolerance)")


def run_grid(kernels: dict, dtypes, device="cpu", ops: set | None = None) -> list[CheckResult]:
    """Check every case whose op has a kernel supporting the dtype; returns all results."""
    out = []
    for case in CASES:
        k = kernels.get(case.op)
        if k is None or (ops is not None and case.op not in ops):
            continue
        for dt in dtypes:
            if k.supports(dt):
                out.append(check(k.fn, case, dt, device))
    return out
