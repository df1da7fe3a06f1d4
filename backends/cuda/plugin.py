"""Entry point of the NVIDIA CUDA backend (group ``glm_runtime.backends``)."""
from __future__ import annotations

import torch

from glm_runtime.backends.triton.gpu_runtime import TorchGPUBackend, read_first_line
from glm_runtime.core.registry import Check, hookimpl


class CUDABackend(TorchGPUBackend):
    """NVIDIA GPUs through a CUDA build of PyTorch.

    fp16 everywhere (tensor cores from sm_70), bf16 from sm_80 (Ampere); warp 32;
    collectives over NCCL. Kernels: Triton (norms, rotary, gated activations, INT8/INT4
    weight-only matmul, attention) with the sm_XX entry of the tuning table; GEMMs via
    cuBLAS through ``F.linear``.
    """

    name = "cuda"
    description = "NVIDIA GPUs (CUDA build of PyTorch; Triton kernels, NCCL)"
    platform = "cuda"
    warp_size = 32
    toolchain_label = "CUDA"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    forward_env_prefixes = ("CUDA_", "NCCL_", "TORCH_NCCL_", "NVIDIA_")
    base_score = 100

    def toolchain_version(self):
        return torch.version.cuda

    def build_problem(self):
        if torch.version.hip:
            return (f"torch {torch.__version__} is a ROCm/HIP build (HIP {torch.version.hip}), not a CUDA build: "
                    f"use --backend rocm (AMD) or --backend dcu (Hygon)")
        if not torch.version.cuda:
            return (f"torch {torch.__version__} was built without CUDA (a CPU-only build); install a CUDA build "
                    f"of torch to use NVIDIA GPUs")
        return None

    def arch_of(self, index):
        major, minor = torch.cuda.get_device_capability(index)
        return f"sm_{major}{minor}"

    def bf16_ok(self, arch, props):
        return props.major >= 8  # bf16 tensor-core math arrived with Ampere (sm_80)

    def driver_checks(self):
        v = read_first_line("/proc/driver/nvidia/version")  # readable without touching the GPU
        return [Check("NVIDIA driver", v is not None, v or "/proc/driver/nvidia/version not readable "
                                                            "(no NVIDIA kernel driver loaded)")]


@hookimpl
def glm_backends():
    return [CUDABackend()]
