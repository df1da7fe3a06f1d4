"""Entry point of the cpu backend (group ``glm_runtime.backends``)."""
from __future__ import annotations

import os
import platform

import torch

from glm_runtime.core.ops import Kernel, reference
from glm_runtime.core.registry import Backend, Capabilities, Check, Probe, hookimpl

from . import kernels, quant_kernels

FP32 = frozenset({torch.float32})
LINEAR_IMPL = ("oneDNN GEMM (F.linear where gradients are needed)" if kernels.ONEDNN_LINEAR else
               "F.linear (MKL; this torch has no oneDNN)")


class CPUBackend(Backend):
    """Reference backend: runs everywhere, computes in fp32.

    fp16/bf16 weights are accepted and upcast at load: half-precision matmul on typical
    server CPUs runs hundreds of times slower than fp32.
    """

    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    description = "PyTorch on the host CPU (reference, fp32 compute)"

    def probe(self) -> Probe:
        return Probe(True, f"{os.cpu_count()} CPU threads, torch {torch.__version__}", score=10,
                     devices=[platform.processor() or platform.machine()])

    def capabilities(self) -> Capabilities:
        return Capabilities(arch=platform.machine(), compute_dtypes=(torch.float32,))

    def kernels(self) -> dict[str, Kernel]:
        return {
            "embedding": Kernel(kernels.embedding, FP32, "F.embedding"),
            "linear": Kernel(kernels.linear, FP32, LINEAR_IMPL),
            "lm_head": Kernel(kernels.lm_head, FP32, LINEAR_IMPL),
            "layer_norm": Kernel(kernels.layer_norm, FP32, "F.layer_norm"),
            "rms_norm": Kernel(kernels.rms_norm, FP32, "F.rms_norm"),
            "attention": Kernel(kernels.attention, FP32, "grouped-query matmul attention, fp32 softmax"),
            "glu": Kernel(kernels.glu, FP32, "F.silu / F.gelu(erf)"),
            "gelu_tanh": Kernel(kernels.gelu_tanh, FP32, "F.gelu(tanh)"),
            "rotary": Kernel(kernels.rotary, FP32, "pair-index rotation, tables once per forward"),
            "quantized_linear": Kernel(quant_kernels.quantized_linear, FP32,
                                       "aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu"),
            "cross_entropy": Kernel(reference.cross_entropy, FP32, "reference (adopted)"),
        }

    def prepare_parameter(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Without oneDNN (:data:`kernels.ONEDNN_LINEAR`), store matrices of linears as
        [in, out] in memory, seen as the [out, in] view: ``F.linear`` on that view runs
        MKL's GEMV over contiguous rows of the transposed matrix, measured at the
        streaming-read bandwidth against 3-5 GB/s for the [out, in] layout, which is what
        bounds decoding. oneDNN reads the [out, in] layout best, so it is kept then. The
        embedding table keeps rows contiguous (it is gathered by row).
        """
        if kernels.ONEDNN_LINEAR:
            return tensor
        if tensor.dim() == 2 and tensor.is_floating_point() and name != "embed.weight":
            return tensor.t().contiguous().t()
        return tensor

    def doctor(self) -> list[Check]:
        return [Check("torch", True, torch.__version__),
                Check("threads", True, str(torch.get_num_threads())),
                Check("fp32 matmul", bool(torch.ones(4, 4).matmul(torch.ones(4, 4)).eq(4).all()), "smoke")]


@hookimpl
def glm_backends():
    return [CPUBackend()]
