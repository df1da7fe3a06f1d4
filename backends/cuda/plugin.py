"""Entry point of the NVIDIA CUDA backend (group ``glm_runtime.backends``)."""
from __future__ import annotations

import torch

from glm_runtime.backends.triton.gpu_runtime import TorchGPUBackend, read_first_line
from glm_runtime.core.registry import Check, hookimpl
from glm_runtime.core.registry.capture import StaticCall


class CUDABackend(TorchGPUBackend):
    """NVIDIA GPUs through a CUDA build of PyTorch.

    fp16 everywhere (tensor cores from sm_70), bf16 from sm_80 (Ampere); warp 32;
    collectives over NCCL. Kernels: Triton (norms, rotary, gated activations, INT8/INT4
    weight-only matmul, attention) with the sm_XX entry of the tuning table; GEMMs via
    cuBLAS through ``F.linear``. Decode steps of fixed shape can be recorded as CUDA graphs
    (:meth:`capture`).
    """

    name = "cuda"
    description = "NVIDIA GPUs (CUDA build of PyTorch; Triton kernels, NCCL)"
    platform = "cuda"
    warp_size = 32
    toolchain_label = "CUDA"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    forward_env_prefixes = ("CUDA_", "NCCL_", "TORCH_NCCL_", "NVIDIA_")
    base_score = 100
    #: runs of the function before it is recorded (see :meth:`capture`)
    capture_warmup = 2

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

    def capture(self, fn, example_inputs):
        """Record ``fn`` as a CUDA graph (``torch.cuda.CUDAGraph``) and return its replay
        behind static buffers (:class:`~glm_runtime.core.registry.capture.StaticCall`).

        ``fn`` first runs :attr:`capture_warmup` times on a side stream, as torch's CUDA
        graph documentation prescribes: whatever initialises lazily (cuBLAS workspaces,
        Triton's compilation and first launch of each kernel, the caching allocator's
        blocks) must happen outside the recording, where it is not allowed. Then it is
        recorded once; the graph keeps the memory of its intermediates and outputs in a
        private pool of its own. Each call copies its arguments into the recorded inputs
        and replays. Not yet run on a GPU by this project (docs/backends.md).
        """
        static = tuple(x.clone() for x in example_inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.capture_warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*static)
        return StaticCall(static, outputs, graph.replay)

    def driver_checks(self):
        v = read_first_line("/proc/driver/nvidia/version")  # readable without touching the GPU
        return [Check("NVIDIA driver", v is not None, v or "/proc/driver/nvidia/version not readable "
                                                            "(no NVIDIA kernel driver loaded)")]


@hookimpl
def glm_backends():
    return [CUDABackend()]
