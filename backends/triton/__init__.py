"""Triton kernels for the op contract, shared by the GPU backends (NVIDIA CUDA, AMD ROCm,
Hygon DCU) with a per-platform, per-arch tuning table.

One kernel source serves every GPU: Triton compiles it to PTX on NVIDIA and to AMDGCN on
ROCm/DTK. What differs per device is only the launch configuration (block sizes, warps,
pipeline stages), which lives in :mod:`glm_runtime.backends.triton.tuning`.

The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter),
which is how CI verifies their numerics without a GPU (see docs/backends.md).
"""
