"""The Triton kernels compile for real GPU targets, with each tuning entry's configuration.

Triton compiles for a named target without the device (PTX + cubin through the ptxas in
the triton wheel; AMDGCN + hsaco for AMD), so this checks on a CPU machine what the
interpreter cannot: that the NVIDIA and AMD compilers accept every kernel at GLM's shapes
(head 128, hidden 4096) with the launch configuration of a tuning entry, and that the
shared memory it needs fits the architecture. Run in a subprocess: the kernels must be
defined without ``TRITON_INTERPRET``. The full matrix (every entry, fp16 and bf16) is
``python -m glm_runtime.backends.triton.aot --dtypes fp16,bf16``; its result is in docs/backends.md.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_conformance_kit import ROOT


@pytest.mark.slow
def test_kernels_compile_for_nvidia_and_amd_targets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    r = subprocess.run([sys.executable, "-m", "glm_runtime.backends.triton.aot", "cuda/sm_90", "rocm/gfx942", "dcu/gfx906"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert len(lines) == 3 * 9 and all(" ok " in ln for ln in lines), r.stdout  # 9 kernel specializations
    attn_sm90 = next(ln for ln in lines if ln.startswith("cuda/sm_90") and "attention" in ln)
    assert "shared" in attn_sm90
