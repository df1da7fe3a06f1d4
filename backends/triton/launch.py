"""Small helpers shared by the kernel launchers."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel should feed ``tl.dot`` fp32 operands for inputs of ``dtype``.

    fp32 inputs: always, with IEEE precision (no TF32), to meet the fp32 contract.
    bf16 inputs under the interpreter: its bf16 ``tl.dot`` is wrong, so operands are upcast
    (exactly) there; on hardware bf16 goes to the tensor/matrix cores directly.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))
