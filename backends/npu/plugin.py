"""Entry point of the Ascend NPU backend (group ``glm_runtime.backends``).

torch-npu is an optional extra (``glm-runtime[npu]``) and needs Huawei's CANN toolkit
installed and sourced (``set_env.sh``). Installed without CANN, it breaks ``import torch``
in *every* program: torch auto-loads device backends registered under the
``torch.backends`` entry-point group, and torch-npu's import fails on CANN libraries such
as ``libhccl.so``. ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` switches the auto-load off (glmrt
sets it); the probe and ``glmrt doctor`` name this state instead of crashing.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

from glm_runtime.core.errors import BackendError
from glm_runtime.core.ops import Kernel, reference
from glm_runtime.core.registry import Backend, Capabilities, Check, Probe, hookimpl

from . import kernels as K

HALF = frozenset({torch.float16, torch.bfloat16})
ALL = frozenset({torch.float16, torch.bfloat16, torch.float32})
CANN_HINTS = ("libhccl", "libascend", "libacl", "libge_runner", "libgraph", "libruntime", "libtorch_npu", ".so")


def cann_root() -> Path | None:
    for cand in (os.environ.get("ASCEND_TOOLKIT_HOME"), os.environ.get("ASCEND_HOME_PATH"),
                 "/usr/local/Ascend/ascend-toolkit/latest"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def cann_version() -> str | None:
    root = cann_root()
    if root is None:
        return None
    for f in ("version.cfg", "compiler/version.info", "runtime/version.info"):
        p = root / f
        if p.is_file():
            for line in p.read_text(errors="replace").splitlines():
                if "version" in line.lower() and "=" in line:
                    return line.split("=", 1)[1].strip().strip('"')
    return "version file not found"


def import_failure_reason(e: BaseException) -> str:
    msg = f"torch_npu import failed with {type(e).__name__}: {e}"
    if any(h in str(e) for h in CANN_HINTS):
        where = cann_root()
        msg += ("; CANN's libraries are not on the library path" +
                (f" (CANN at {where}: run `source {where}/../set_env.sh`)" if where else
                 " (no CANN toolkit found: $ASCEND_TOOLKIT_HOME unset, /usr/local/Ascend missing)"))
    msg += ("; while this import fails, plain `import torch` also fails unless TORCH_DEVICE_BACKEND_AUTOLOAD=0 "
            "(torch auto-loads torch-npu; glmrt sets it to 0)")
    return msg


def load_torch_npu():
    """(module, None) or (None, reason). Importing registers the ``npu`` device; it does not
    open a device (the ACL runtime initialises lazily at the first device operation)."""
    if importlib.util.find_spec("torch_npu") is None:
        return None, ("torch_npu is not installed (install Ascend CANN, source its set_env.sh, then "
                      "pip install 'glm-runtime[npu]' with the torch-npu version matching torch "
                      f"{torch.__version__})")
    try:
        import torch_npu
    except Exception as e:  # noqa: BLE001 - the reason is the product here
        return None, import_failure_reason(e)
    return torch_npu, None


class NPUBackend(Backend):
    """Huawei Ascend NPUs (910/910B) via torch-npu, HCCL collectives."""

    name = "npu"
    aliases = ("ascend",)
    description = "Huawei Ascend NPUs (torch-npu + CANN fused operators, HCCL)"
    device_type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    forward_env_prefixes = ("ASCEND_", "HCCL_", "ACL_", "TASK_QUEUE_", "PYTORCH_NPU_", "CANN_")

    def probe(self) -> Probe:
        mod, why = load_torch_npu()
        if mod is None:
            return Probe(False, why)
        n = mod.npu.device_count()
        if n == 0:
            env = os.environ.get(self.visible_devices_env)
            return Probe(False, f"torch_npu {self._version()} sees no NPU"
                         + (f" ({self.visible_devices_env}={env!r})" if env is not None else
                            " (is the Ascend driver installed? see `glmrt doctor`)"))
        return Probe(True, f"{n} NPU(s), torch_npu {self._version()}, CANN {cann_version()}", score=100,
                     devices=[f"npu:{i}" for i in range(n)])

    @staticmethod
    def _version() -> str:
        try:
            return importlib.metadata.version("torch-npu")
        except importlib.metadata.PackageNotFoundError:
            return "unknown version"

    def capabilities(self) -> Capabilities:
        mod, _ = load_torch_npu()
        arch = "unavailable"
        if mod is not None and mod.npu.device_count():
            arch = mod.npu.get_device_name(0)
        return Capabilities(arch=arch, compute_dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            extra={"kernels": sorted(self.kernels()), "peak_gbps": None, "peak_tflops_fp16": None})

    def kernels(self) -> dict[str, Kernel]:
        return {
            "attention": Kernel(K.attention, HALF, "torch_npu.npu_fusion_attention (BNSD, prefix sparse_mode 5)"),
            "rms_norm": Kernel(K.rms_norm, ALL, "torch_npu.npu_rms_norm"),
            "rotary": Kernel(K.rotary, ALL, "torch_npu.npu_rotary_mul (half / interleave, BSND)"),
            "glu": Kernel(K.glu, ALL, "torch_npu.npu_swiglu; GeGLU as torch ops"),
            "quantized_linear": Kernel(K.quantized_linear, HALF, "torch_npu.npu_weight_quant_batchmatmul"),
            "layer_norm": Kernel(K.layer_norm, ALL, "torch F.layer_norm (CANN LayerNorm)"),
            "gelu_tanh": Kernel(K.gelu_tanh, ALL, "torch F.gelu(tanh)"),
            "linear": Kernel(K.linear, ALL, "torch F.linear (CANN MatMul)"),
            "lm_head": Kernel(K.lm_head, ALL, "torch F.linear (CANN MatMul)"),
            "embedding": Kernel(torch.nn.functional.embedding, ALL, "torch F.embedding"),
            "cross_entropy": Kernel(reference.cross_entropy, ALL, "reference, fp32 (adopted)"),
        }

    def setup_process(self, local_rank: int) -> torch.device:
        mod, why = load_torch_npu()
        if mod is None:
            raise BackendError(why)
        mod.npu.set_device(local_rank)
        return torch.device("npu", local_rank)

    def synchronize(self) -> None:
        mod, _ = load_torch_npu()
        if mod is not None:
            mod.npu.synchronize()

    def doctor(self) -> list[Check]:
        checks = [Check("torch", True, torch.__version__)]
        installed = importlib.util.find_spec("torch_npu") is not None
        checks.append(Check("torch-npu", installed, self._version() if installed else "not installed"))
        cv = cann_version()
        checks.append(Check("CANN toolkit", cv is not None, f"{cv} at {cann_root()}" if cv else
                            "not found ($ASCEND_TOOLKIT_HOME, /usr/local/Ascend/ascend-toolkit/latest)"))
        drv = Path("/usr/local/Ascend/driver/version.info")
        checks.append(Check("Ascend driver", drv.is_file(), drv.read_text(errors="replace").strip().splitlines()[0]
                            if drv.is_file() else f"{drv} not found"))
        if installed:
            mod, why = load_torch_npu()
            checks.append(Check("import torch_npu", mod is not None, why or "ok"))
            if mod is not None:
                n = mod.npu.device_count()
                checks.append(Check("devices", n > 0, str(n)))
                if n:
                    x = torch.ones(64, 64, dtype=torch.float16, device="npu:0")
                    checks.append(Check("fp16 matmul smoke", bool((x @ x).eq(64).all()), "64x64 ones"))
        return checks


@hookimpl
def glm_backends():
    return [NPUBackend()]
