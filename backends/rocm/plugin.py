"""Entry point of the AMD ROCm and Hygon DCU backends (group ``glm_runtime.backends``).

Hygon's DCUs run PyTorch through DTK, Hygon's ROCm/HIP distribution: the torch build
reports ``torch.version.hip``, devices appear under torch's ``cuda`` device type, and the
collectives library behind the ``nccl`` name is RCCL. They are a backend of their own
here (``dcu``), not an AMD device in disguise: own arch list (gfx906 Z100, gfx926 K100,
gfx928 K100-AI), own tuning table, own bf16 facts. Both backends use wavefront 64.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from glm_runtime.backends.triton.gpu_runtime import TorchGPUBackend, read_first_line
from glm_runtime.core.registry import Check, hookimpl

# Hygon DCU architectures as DTK reports them (gcnArchName), with bf16 matrix support.
# gfx906 is also AMD's Vega 20 (MI50/MI60): no bf16 dot instructions (they came with
# gfx908). gfx926's bf16 support is not documented where we could read it: treated as
# absent (bf16 checkpoints then compute in fp32 rather than risk slow emulation).
DCU_ARCHES = {"gfx906": False, "gfx926": False, "gfx928": True}
# AMD Instinct with bf16 matrix cores: gfx908 (MI100), gfx90a (MI200), gfx94x (MI300).
AMD_BF16_PREFIXES = ("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def _hip_problem(label: str) -> str | None:
    if torch.version.hip:
        return None
    if torch.version.cuda:
        return (f"torch {torch.__version__} is a CUDA build (CUDA {torch.version.cuda}), not a ROCm/HIP build: "
                f"use --backend cuda, or install {label}'s build of torch")
    return (f"torch {torch.__version__} was built without ROCm/HIP (a CPU-only build); install {label}'s "
            f"build of torch")


DEFAULT_DTK = "/opt/dtk"  # where DTK's installer puts it


def dtk_root() -> Path | None:
    """Hygon DTK install: $DTK_HOME, a ROCM_PATH naming dtk, or /opt/dtk."""
    for cand in (os.environ.get("DTK_HOME"), os.environ.get("ROCM_PATH"), DEFAULT_DTK):
        if cand and "dtk" in cand.lower() and Path(cand).is_dir():
            return Path(cand)
    return None


def rocm_version_file(root: Path | None) -> str | None:
    if root is None:
        return None
    return read_first_line(root / ".info" / "version") or read_first_line(root / ".info" / "version-dev")


class ROCmBackend(TorchGPUBackend):
    """AMD Instinct/Radeon GPUs through a ROCm build of PyTorch (HIP, RCCL, wavefront 64)."""

    name = "rocm"
    description = "AMD GPUs (ROCm/HIP build of PyTorch; Triton kernels, RCCL under the nccl name)"
    platform = "rocm"
    warp_size = 64
    toolchain_label = "HIP"
    visible_devices_env = "HIP_VISIBLE_DEVICES"
    forward_env_prefixes = ("HIP_", "ROCR_", "ROCM_", "HSA_", "NCCL_", "RCCL_", "TORCH_NCCL_", "MIOPEN_")
    base_score = 90
    vendor_label = "AMD ROCm"

    def visible_env_all(self):
        return ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")

    def toolchain_version(self):
        return torch.version.hip

    def build_problem(self):
        return _hip_problem(self.vendor_label)

    def arch_of(self, index):
        return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]

    def bf16_ok(self, arch, props):
        return arch.startswith(AMD_BF16_PREFIXES)

    def driver_checks(self):
        root = Path(os.environ.get("ROCM_PATH", "/opt/rocm"))
        v = rocm_version_file(root)
        drv = read_first_line("/sys/module/amdgpu/version")
        return [Check("ROCm", v is not None, f"{v} at {root}" if v else f"no ROCm version file under {root}"),
                Check("amdgpu driver", drv is not None or Path("/dev/kfd").exists(),
                      drv or ("/dev/kfd present" if Path("/dev/kfd").exists() else "no /dev/kfd: kernel driver not loaded"))]


class DCUBackend(ROCmBackend):
    """Hygon DCU (Z100 gfx906, K100 gfx926, K100-AI gfx928) through DTK's PyTorch."""

    name = "dcu"
    aliases = ("hygon",)
    description = "Hygon DCU (DTK build of PyTorch; Triton kernels, RCCL under the nccl name)"
    platform = "dcu"
    vendor_label = "Hygon DTK"
    base_score = 95  # above rocm: on a DCU machine both probe available, dcu carries the DCU tuning
    forward_env_prefixes = ROCmBackend.forward_env_prefixes + ("DTK_",)

    def extra_problem(self):
        if dtk_root() is None:
            return ("HIP devices are visible but no Hygon DTK install was found ($DTK_HOME, a $ROCM_PATH "
                    "naming dtk, /opt/dtk): this looks like an AMD machine, use --backend rocm")
        return None

    def bf16_ok(self, arch, props):
        return DCU_ARCHES.get(arch, False)

    def driver_checks(self):
        root = dtk_root()
        v = rocm_version_file(root)
        return [Check("DTK", root is not None, f"{v or 'version unknown'} at {root}" if root
                      else "no DTK found ($DTK_HOME, $ROCM_PATH, /opt/dtk)")]

    def capabilities(self, index=None):
        caps = super().capabilities(index)
        if caps.arch != "unavailable":
            caps.extra["known_dcu_arch"] = caps.arch in DCU_ARCHES
            caps.extra["dcu_arches"] = sorted(DCU_ARCHES)
        return caps


@hookimpl
def glm_backends():
    return [ROCmBackend(), DCUBackend()]
