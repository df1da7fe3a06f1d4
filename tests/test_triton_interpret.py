"""The Triton kernels of the GPU backends, run by Triton's interpreter on CPU tensors.

This is the real kernel source (the same ``@triton.jit`` functions the GPUs compile),
executed element by element by ``TRITON_INTERPRET=1``, through the conformance kit of the
backends that ship it: every op over the case grid in fp16/bf16/fp32 with the contract's
tolerances, tiny models against the cpu backend, and the two-process check. What the
interpreter cannot show (compiled-code numerics on the device, speed, the tuning tables'
effect) is stated in docs/backends.md. Each run is a subprocess: interpreter mode is
fixed when the kernels are defined, at import.

bf16: the interpreter's bf16 ``tl.dot`` is wrong, so under it the dot operands of bf16
inputs are upcast to fp32 (exact; see backends/triton/launch.py); the bf16 rows therefore
verify everything but the bf16 tensor-core path itself.
"""
from __future__ import annotations

import pytest
from test_conformance_kit import kit

INTERP = {"TRITON_INTERPRET": "1"}


def _ok(r):
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "failed" not in r.stdout


def test_cuda_triton_kernels_every_op_and_dtype():
    r = kit("--glm-backend", "cuda", "--glm-host", "-k", "test_op or test_declares", env=INTERP)
    _ok(r)
    assert "97 passed" in r.stdout  # 32 cases x 3 dtypes + identity: nothing skipped


def test_dcu_gfx906_tuning_table_every_op():
    # the smallest tiles of any table: more loop iterations and partial tiles in every kernel
    r = kit("--glm-backend", "dcu", "--glm-host", "--glm-dtypes", "fp16", "-k", "test_op",
            env={**INTERP, "GLM_TRITON_ARCH": "gfx906"})
    _ok(r)
    assert "33 passed" in r.stdout  # 32 cases + the identity check (its module name matches too)


def test_rocm_gfx942_table_on_the_attention_and_quant_kernels():
    # the largest tiles (128x128x64 matmul, 128x64 attention): single partial tiles everywhere
    r = kit("--glm-backend", "rocm", "--glm-host", "--glm-dtypes", "fp16", "-k",
            "test_op and (attention or quantized_linear)", env={**INTERP, "GLM_TRITON_ARCH": "gfx942"})
    _ok(r)
    assert "14 passed" in r.stdout  # 6 attention + 8 quantized_linear cases


@pytest.mark.slow
def test_cuda_triton_kernels_tiny_models_match_cpu():
    # prefix mask + neox + GeGLU + LayerNorm + INT8 (GLM-130B); interleaved partial rotary +
    # GQA + SwiGLU + RMSNorm + INT4 (ChatGLM2); both through prefill and KV-cache decode.
    # (2D rotary and tanh GeLU are covered op by op above.)
    r = kit("--glm-backend", "cuda", "--glm-host", "--glm-dtypes", "fp16", "-k",
            "test_model and (glm-130b-8 or chatglm2-4)", env=INTERP)
    _ok(r)
    assert "2 passed" in r.stdout


@pytest.mark.slow
def test_cuda_triton_kernels_two_process_tensor_parallel():
    r = kit("--glm-backend", "cuda", "--glm-host", "--glm-dtypes", "fp16", "-k", "test_two_process", env=INTERP)
    _ok(r)
    assert "1 passed" in r.stdout


SKIP_CHECK = r"""
import torch
from glm_runtime.backends.triton import attention as A
from glm_runtime.backends.triton.tuning import AttnCfg
from glm_runtime.core.ops import reference as R

g = torch.Generator().manual_seed(0)
B, H, T, D = 2, 2, 40, 16
q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
m = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T).clone()
m[1, 0, 5, :] = False  # a query row with no allowed key at all
live = A.live_tiles(m, B, T, T, 16, 16)
assert live[0].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]], live[0]  # causal: 3 of 9 tiles skipped
assert live[1, 0].tolist() == [1, 1, 1]  # the empty row's block keeps every tile
o = A.attention(q, k, v, m, 0.25, None, 1.0, AttnCfg(16, 16, 4, 1))
ref = R.attention(q, k, v, m, 0.25)
assert not torch.isnan(o).any() and (o - ref).abs().max() < 1e-5, (o - ref).abs().max()
print("ok")
"""


def test_attention_skips_dead_tiles_and_keeps_empty_rows_exact():
    import os
    import subprocess
    import sys

    from test_conformance_kit import ROOT

    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", PYTHONPATH=str(ROOT), **INTERP)
    r = subprocess.run([sys.executable, "-c", SKIP_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
