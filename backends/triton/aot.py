"""Ahead-of-time compilation of the Triton kernels for GPUs this machine does not have.

Triton compiles for a named target without a device: PTX and a cubin (with the ptxas that
ships in the triton wheel) for NVIDIA ``sm_XX``, AMDGCN and an hsaco for AMD ``gfxNNN``.
Compiling every kernel with each tuning entry's launch configuration (block sizes, warps,
pipeline stages) at GLM's shapes (head size 128, fp16 and bf16) proves, per target, that
the kernel source is accepted by that backend's compiler, that each configuration
lowers (dot shapes, layouts, the software pipeline) and that its shared memory fits the
architecture. It does not run anything: numerics are the interpreter's part
(tests/test_triton_interpret.py), speed the hardware's (``glmrt doctor --bench``).

    python -m glm_runtime.backends.triton.aot                 # every platform/arch entry, fp16
    python -m glm_runtime.backends.triton.aot cuda/sm_90 dcu/gfx906 --dtypes fp16,bf16

Upstream Triton (3.9 here) does not know Hygon's gfx926/gfx928 ("unsupported target"):
on those DCUs the kernels need the Triton build that ships with DTK.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default

import argparse

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import activations, attention, norms, quant_matmul, rotary  # noqa: E402
from .tuning import TABLES, Tuning  # noqa: E402

# The architecture a table's "default" entry is compiled for, and shared memory per block
# (bytes) the architectures offer: NVIDIA's opt-in maximum per block; AMD's LDS per workgroup.
DEFAULT_ARCH = {"cuda": "sm_80", "rocm": "gfx90a", "dcu": "gfx906"}
SHARED_LIMIT = {"sm_70": 96 << 10, "sm_75": 64 << 10, "sm_80": 163 << 10, "sm_86": 99 << 10, "sm_89": 99 << 10,
                "sm_90": 227 << 10, "gfx90a": 64 << 10, "gfx942": 64 << 10, "gfx906": 64 << 10, "gfx926": 64 << 10,
                "gfx928": 64 << 10}
HEAD = 128  # GLM head size
HIDDEN = 4096


@dataclass
class Result:
    entry: str
    kernel: str
    ok: bool
    shared: int | None
    limit: int | None
    seconds: float
    error: str = ""


class _quiet_stderr:
    """Collect what the compiler's C++ passes print to file descriptor 2 (MLIR dumps on
    failure) instead of flooding the terminal; the first ``error:`` line is reported."""

    def __enter__(self):
        self._file = tempfile.TemporaryFile(mode="w+b")
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False

    def text(self) -> str:
        self._file.seek(0)
        return self._file.read().decode(errors="replace")


def target_of(platform: str, arch: str) -> GPUTarget:
    if platform == "cuda":
        return GPUTarget("cuda", int(arch.removeprefix("sm_")), 32)
    return GPUTarget("hip", arch, 64)


def _signature(fn, ptr: dict[str, str], floats=()) -> dict[str, str]:
    """Argument types in the kernel's parameter order: pointers as given, the named floats
    fp32, ``tl.constexpr`` parameters constexpr, every other scalar i32."""
    out = {}
    for p in fn.params:
        if p.is_constexpr:
            out[p.name] = "constexpr"
        else:
            out[p.name] = ptr.get(p.name) or ("fp32" if p.name in floats else "i32")
    return out


def kernel_specs(t: Tuning, dt: str):
    """(name, jit fn, signature, constexprs, options) for each kernel as the launchers use it."""
    p = f"*{dt}"
    row_warps = t.row.warps_for(HIDDEN)
    mm = t.matmul
    att = t.attention
    return [
        ("rms_norm", norms._rms_norm_kernel, _signature(norms._rms_norm_kernel, dict(X=p, W=p, Y=p), ("eps",)),
         {"BLOCK": HIDDEN}, dict(num_warps=row_warps)),
        ("layer_norm", norms._layer_norm_kernel,
         _signature(norms._layer_norm_kernel, dict(X=p, W=p, B=p, Y=p), ("eps",)),
         {"HAS_BIAS": True, "BLOCK": HIDDEN}, dict(num_warps=row_warps)),
        ("rotary", rotary._rotary_kernel, _signature(rotary._rotary_kernel, dict(X=p, C=p, S=p, Y=p)),
         {"LAYOUT": 2, "BLOCK_T": t.rotary.block_t, "BLOCK_D": HEAD}, dict(num_warps=t.rotary.num_warps)),
        ("glu", activations._glu_kernel, _signature(activations._glu_kernel, dict(U=p, Y=p)),
         {"ACT": 0, "BLOCK": t.row.block}, dict(num_warps=t.row.warps_for(t.row.block))),
        ("gelu_tanh", activations._gelu_tanh_kernel, _signature(activations._gelu_tanh_kernel, dict(X=p, Y=p)),
         {"BLOCK": t.row.block}, dict(num_warps=t.row.warps_for(t.row.block))),
        ("wq_matmul int4 prefill", quant_matmul._wq_matmul_kernel,
         _signature(quant_matmul._wq_matmul_kernel, dict(X=p, Q="*i8", S="*fp16", Bias=p, Y=p)),
         {"BITS": 4, "QBLOCK": 0, "HAS_BIAS": False, "DOT_F32": False, "BLOCK_M": mm.block_m,
          "BLOCK_N": mm.block_n, "BLOCK_K": mm.block_k}, dict(num_warps=mm.num_warps, num_stages=mm.num_stages)),
        ("wq_matmul int4 block-32 decode", quant_matmul._wq_matmul_kernel,
         _signature(quant_matmul._wq_matmul_kernel, dict(X=p, Q="*i8", S="*fp16", Bias=p, Y=p)),
         {"BITS": 4, "QBLOCK": 32, "HAS_BIAS": False, "DOT_F32": False, "BLOCK_M": t.matmul_decode.block_m,
          "BLOCK_N": t.matmul_decode.block_n, "BLOCK_K": min(32, t.matmul_decode.block_k)},
         dict(num_warps=t.matmul_decode.num_warps, num_stages=t.matmul_decode.num_stages)),
        ("wq_matmul int8 decode", quant_matmul._wq_matmul_kernel,
         _signature(quant_matmul._wq_matmul_kernel, dict(X=p, Q="*i8", S="*fp16", Bias=p, Y=p)),
         {"BITS": 8, "QBLOCK": 0, "HAS_BIAS": True, "DOT_F32": False, "BLOCK_M": t.matmul_decode.block_m,
          "BLOCK_N": t.matmul_decode.block_n, "BLOCK_K": t.matmul_decode.block_k},
         dict(num_warps=t.matmul_decode.num_warps, num_stages=t.matmul_decode.num_stages)),
        ("attention", attention._attn_kernel,
         _signature(attention._attn_kernel, dict(Q=p, K=p, V=p, Mask="*u8", Live="*u8", O=p),
                    ("sm_scale", "fill")),
         {"HAS_MASK": True, "DOT_F32": False, "BLOCK_M": att.block_m, "BLOCK_N": att.block_n, "BLOCK_D": HEAD},
         dict(num_warps=att.num_warps, num_stages=att.num_stages)),
    ]


def compile_entry(platform: str, arch_key: str, dtypes=("fp16",), only: set | None = None) -> list[Result]:
    t = TABLES[platform][arch_key]
    arch = DEFAULT_ARCH[platform] if arch_key == "default" else arch_key
    target = target_of(platform, arch)
    out = []
    for dt in dtypes:
        for name, fn, sig, consts, opts in kernel_specs(t, dt):
            if only and name.split()[0] not in only:
                continue
            label = f"{platform}/{arch_key}" + ("" if arch_key != "default" else f" (as {arch})")
            start = time.perf_counter()
            try:
                with _quiet_stderr() as diag:
                    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                       options=opts)
                shared = int(k.metadata.shared)
                limit = SHARED_LIMIT.get(arch)
                ok = limit is None or shared <= limit
                err = "" if ok else f"needs {shared} B shared memory, {arch} offers {limit}"
                out.append(Result(label, f"{name} [{dt}]", ok, shared, limit, time.perf_counter() - start, err))
            except Exception as e:  # noqa: BLE001 - a compile failure is the result being reported
                first = next((ln.split("error: ", 1)[1] for ln in diag.text().splitlines() if "error: " in ln),
                             (str(e).strip().splitlines() or [type(e).__name__])[-1])
                out.append(Result(label, f"{name} [{dt}]", False, None, SHARED_LIMIT.get(arch),
                                  time.perf_counter() - start, f"{type(e).__name__}: {first[:200]}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glm_runtime.backends.triton.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("entries", nargs="*", help="platform/arch entries of the tuning tables (default: all)")
    ap.add_argument("--dtypes", default="fp16", help="comma-separated: fp16,bf16 (default fp16)")
    a = ap.parse_args(argv)
    entries = [e.split("/") for e in a.entries] or [[p, k] for p, table in TABLES.items() for k in table]
    dtypes = tuple(a.dtypes.split(","))
    bad = 0
    for platform, arch in entries:
        for r in compile_entry(platform, arch, dtypes):
            bad += not r.ok
            shared = "-" if r.shared is None else f"{r.shared // 1024} KiB"
            print(f"{r.entry:<24} {r.kernel:<30} {'ok ' if r.ok else 'FAIL'} shared {shared:>8} "
                  f"{r.seconds:6.1f} s {r.error}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
