"""The NVIDIA CUDA backend: Triton kernels tuned per compute capability, NCCL collectives."""
