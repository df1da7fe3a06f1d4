"""AMD ROCm and Hygon DCU (DTK) backends: Triton kernels tuned per gfx arch, RCCL collectives."""
