"""What the NVIDIA, AMD and Hygon backends share: torch's GPU runtime API and the kernel table.

PyTorch's CUDA builds and its ROCm/HIP builds (AMD's ROCm and Hygon's DTK alike) expose
the same ``torch.cuda`` module and device type ``cuda``; they differ in the toolchain
(``torch.version.cuda`` vs ``torch.version.hip``), the architecture names (``sm_90`` vs
``gfx942``/``gfx928``), the SIMD width (warp 32 vs wavefront 64), the visible-devices
variables and the collectives library under the ``nccl`` name (NCCL vs RCCL). The
subclasses state those facts; the base class holds the logic.

Probing never initialises the device runtime: it reads the torch build and calls
``torch.cuda.device_count()``, which queries the driver without creating a context
(``torch.cuda.is_initialized()`` stays False). Per-device properties are read by
:meth:`capabilities`, i.e. only once the backend has been selected.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from glm_runtime.backends.triton.tuning import lookup
from glm_runtime.core.ops import Kernel, reference
from glm_runtime.core.ops.contract import tolerance
from glm_runtime.core.registry import Backend, Capabilities, Check, Probe

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
ARCH_ENV = "GLM_TRITON_ARCH"  # force a tuning entry (tuning experiments; host-side verification)

# Published peak figures (memory GB/s, dense fp16 tensor TFLOP/s) by device-name fragment,
# first match wins; used by `glmrt doctor --bench` to put achieved rates in proportion.
# Devices not listed (Hygon DCUs among them) report achieved rates only.
PEAKS = (
    ("H200", 4800.0, 989.0), ("H100 PCIe", 2000.0, 756.0), ("H100", 3350.0, 989.0),
    ("A100-SXM4-80GB", 2039.0, 312.0), ("A100 80GB PCIe", 1935.0, 312.0), ("A100", 1555.0, 312.0),
    ("V100", 900.0, 125.0), ("MI300X", 5300.0, 1307.0), ("MI250X", 3277.0, 383.0),
)


def peak_of(name: str) -> tuple[float | None, float | None]:
    for frag, gbps, tflops in PEAKS:
        if frag in name:
            return gbps, tflops
    return None, None


def triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def read_first_line(path: str | os.PathLike) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return None


def torch_native_kernels(dtypes=FLOATS) -> dict[str, Kernel]:
    """Ops where the vendor library behind torch is already the right kernel.

    GEMMs go to cuBLAS/hipBLAS(Lt) with fp32 accumulation; a Triton GEMM would only
    re-implement them. The embedding is a gather; cross-entropy is computed in fp32 as the
    contract requires.
    """
    return {
        "linear": Kernel(lambda x, w, b=None: F.linear(x, w, b), dtypes, "torch F.linear (vendor BLAS, fp32 accumulate)"),
        "lm_head": Kernel(lambda x, w: F.linear(x, w), dtypes, "torch F.linear (vendor BLAS, fp32 accumulate)"),
        "embedding": Kernel(F.embedding, dtypes, "torch F.embedding"),
        "cross_entropy": Kernel(reference.cross_entropy, dtypes, "reference, fp32 (adopted)"),
    }


class TorchGPUBackend(Backend):
    """Base of the backends on torch's GPU runtime; subclasses set the platform facts."""

    device_type = "cuda"
    dist_backend = "nccl"
    platform = ""            # key of glm_runtime.backends.triton.tuning.TABLES
    warp_size = 32
    toolchain_label = ""     # how the torch build names its toolchain in messages
    base_score = 100

    # -------------------------------------------------------------- probing
    def build_problem(self) -> str | None:
        """Why this torch build cannot drive this backend's devices (None: it can)."""
        raise NotImplementedError

    def no_device_reason(self) -> str:
        env = ", ".join(f"{v}={os.environ[v]!r}" for v in self.visible_env_all() if v in os.environ)
        return (f"torch {torch.__version__} ({self.toolchain_label} {self.toolchain_version()}) sees no device"
                + (f" ({env})" if env else " (is the driver loaded? see `glmrt doctor`)"))

    def visible_env_all(self) -> tuple[str, ...]:
        return (self.visible_devices_env,) if self.visible_devices_env else ()

    def toolchain_version(self) -> str | None:
        raise NotImplementedError

    def probe(self) -> Probe:
        problem = self.build_problem()
        if problem:
            return Probe(False, problem)
        n = torch.cuda.device_count()  # driver query; does not create a context
        if n == 0:
            return Probe(False, self.no_device_reason())
        extra = self.extra_problem()
        if extra:
            return Probe(False, extra)
        tv = triton_version()
        kern = f"Triton {tv} kernels" if tv else "Triton not installed: fused ops fall back to the reference (loudly)"
        return Probe(True, f"{n} device(s), torch {torch.__version__} ({self.toolchain_label} "
                           f"{self.toolchain_version()}), {kern}", score=self.base_score,
                     devices=[f"{self.device_type}:{i}" for i in range(n)])

    def extra_problem(self) -> str | None:
        """A further reason to decline once devices are visible (the DCU backend uses it)."""
        return None

    # ------------------------------------------------------- capabilities
    def arch_of(self, index: int) -> str:
        raise NotImplementedError

    def bf16_ok(self, arch: str, props) -> bool:
        raise NotImplementedError

    def device_record(self, index: int) -> dict:
        props = torch.cuda.get_device_properties(index)
        arch = self.arch_of(index)
        return {"index": index, "name": props.name, "arch": arch, "memory_bytes": int(props.total_memory),
                "multiprocessors": int(props.multi_processor_count),
                "warp_size": int(getattr(props, "warp_size", self.warp_size) or self.warp_size),
                "bf16": self.bf16_ok(arch, props),
                "peak_gbps": peak_of(props.name)[0], "peak_tflops_fp16": peak_of(props.name)[1]}

    def capabilities(self, index: int | None = None) -> Capabilities:
        """Per-device facts read from the runtime (this does initialise it: call after selection)."""
        if not self.probe().available:
            return Capabilities(arch="unavailable", compute_dtypes=(torch.float32,))
        n = torch.cuda.device_count()
        devs = [self.device_record(i) for i in range(n)]
        me = devs[torch.cuda.current_device() if index is None else index]
        dtypes = (torch.float16, torch.bfloat16, torch.float32) if me["bf16"] else (torch.float16, torch.float32)
        return Capabilities(
            arch=me["arch"], compute_dtypes=dtypes, warp_size=me["warp_size"],
            extra={"devices": devs, "peak_gbps": me["peak_gbps"], "peak_tflops_fp16": me["peak_tflops_fp16"],
                   "tuning": self.tuning_key(me["arch"]), "platform": self.platform,
                   "kernels": sorted(self.kernels())})

    # -------------------------------------------------------------- kernels
    def tuning_arch(self) -> str:
        """The arch whose tuning entry the kernels use: GLM_TRITON_ARCH, the device's, or default."""
        forced = os.environ.get(ARCH_ENV)
        if forced:
            return forced
        if self.build_problem() is None and torch.cuda.device_count() > 0:
            return self.arch_of(torch.cuda.current_device())
        return "default"

    def tuning_key(self, arch: str) -> str:
        t = lookup(self.platform, arch)
        return f"{t.platform}/{t.arch}"

    def kernels(self) -> dict[str, Kernel]:
        ks = torch_native_kernels()
        if triton_version() is None:
            return ks
        from glm_runtime.backends.triton.ops import triton_kernels

        ks.update(triton_kernels(lookup(self.platform, self.tuning_arch()), FLOATS))
        return ks

    # -------------------------------------------------------------- doctor
    def doctor(self) -> list[Check]:
        checks = [Check("torch", True, torch.__version__)]
        problem = self.build_problem()
        checks.append(Check(f"torch {self.toolchain_label} build", problem is None,
                            problem or f"{self.toolchain_label} {self.toolchain_version()}"))
        tv = triton_version()
        checks.append(Check("triton", tv is not None, tv or "not installed (pip install 'glm-runtime[triton]')"))
        checks.extend(self.driver_checks())
        if problem is None:
            n = torch.cuda.device_count()
            checks.append(Check("devices", n > 0, str(n) if n else self.no_device_reason()))
            if n:
                caps = self.capabilities()
                for d in caps.extra["devices"]:
                    checks.append(Check(f"device {d['index']}", True,
                                        f"{d['name']} {d['arch']} warp {d['warp_size']} "
                                        f"{d['memory_bytes'] / 2**30:.0f} GiB bf16={'yes' if d['bf16'] else 'no'}"))
                checks.append(Check("tuning table", True, caps.extra["tuning"]))
                x = torch.ones(64, 64, device=self.device(), dtype=torch.float16)
                ok = bool((x @ x).eq(64).all())
                checks.append(Check("fp16 matmul smoke", ok, "64x64 ones"))
                if tv is not None:
                    checks.append(self.triton_smoke(caps.extra["tuning"]))
        return checks

    def triton_smoke(self, tuning: str) -> Check:
        """Compile and run one Triton kernel on the device, compared with the reference."""
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(8, 512, generator=g), torch.rand(512, generator=g) + 0.5
        try:
            dev = self.device()
            y = self.kernels()["rms_norm"].fn(x.to(dev, torch.float16), w.to(dev, torch.float16), 1e-5)
        except Exception as e:  # noqa: BLE001 - the failure is the finding
            msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            if "unsupported target" in str(e):
                msg += ("; this Triton build does not know the device's arch (upstream Triton lacks Hygon's "
                        "gfx926/gfx928: install the Triton that ships with DTK)")
            return Check("Triton kernel smoke", False, msg)
        ref = reference.rms_norm(x.half().float(), w.half().float(), 1e-5)
        atol, rtol = tolerance(torch.float16)
        ok = bool(((y.float().cpu() - ref).abs() <= atol + rtol * ref.abs()).all())
        return Check("Triton kernel smoke", ok, f"fused RMSNorm compiled and run, tuning {tuning}")

    def driver_checks(self) -> list[Check]:
        return []
