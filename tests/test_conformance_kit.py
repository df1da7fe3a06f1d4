"""The conformance kit itself: it passes the reference backend, and it catches planted bugs.

A kit that cannot fail proves nothing, so a backend is planted with the two classic
porting bugs -- an off-by-one (a Triton RMSNorm launched with N-1 columns; an attention
that drops the last key) and a wrong rotary layout (interleaved pairs rotated as
rotate-half) -- and the kit must fail exactly those ops while passing the untouched ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glm_runtime.conformance.cases import run_grid
from glm_runtime.core.ops import Kernel, reference

ROOT = Path(__file__).resolve().parents[1]


def kit(*args, env=None, cwd=ROOT, timeout=600):
    e = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in (env or {}).get("PYTHONPATH", "").split(os.pathsep)
                                                     if p])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", *args], cwd=cwd,
                          env=e, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_kit_passes_the_cpu_backend_via_the_pytest_plugin():
    # the two-process check on the host CPU (gloo) runs with the template backend
    r = kit("--glm-backend", "cpu", "--glm-strict", "-k", "not test_two_process")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    # 32 op cases + identity + 6 tiny models, all in fp32 (the cpu backend's only compute dtype)
    assert "39 passed" in r.stdout and "failed" not in r.stdout


def test_kit_in_process_on_the_reference_ops_is_exact_enough():
    from glm_runtime.backends.cpu.plugin import CPUBackend

    res = run_grid(CPUBackend().kernels(), [torch.float32])
    assert res and all(r.ok for r in res), [r for r in res if not r.ok]
    assert {r.case.split("-")[0] for r in res} >= {"attention", "rotary", "rms_norm", "layer_norm", "glu"}


def test_kit_fails_python_level_plants():
    def rotary_as_neox(x, cos, sin, layout):
        return reference.rotary(x, cos, sin, "neox")

    def attention_drops_last_key(q, k, v, mask, scale, mask_value=None, layer_scale=1.0):
        m = None if mask is None else mask[..., :-1]
        return reference.attention(q, k[:, :, :-1], v[:, :, :-1], m, scale, mask_value, layer_scale)

    f32 = frozenset({torch.float32})
    planted = {"rotary": Kernel(rotary_as_neox, f32), "attention": Kernel(attention_drops_last_key, f32)}
    res = {r.case: r for r in run_grid(planted, [torch.float32])}
    assert res["rotary-neox-full"].ok and res["rotary-neox-partial"].ok
    for bad in ("rotary-neox_2d", "rotary-interleaved-partial", "rotary-interleaved-full"):
        assert not res[bad].ok, bad
    assert not any(r.ok for c, r in res.items() if c.startswith("attention")), res
    assert "out of tolerance" in res["rotary-interleaved-full"].detail

    # the model-level check catches the rotary plant too (ChatGLM2 uses interleaved pairs)
    from glm_runtime.backends.cpu.plugin import CPUBackend
    from glm_runtime.conformance.model_check import compare
    from glm_runtime.conformance.target import Target

    cpu = CPUBackend()
    target = Target(cpu, {**cpu.kernels(), "rotary": planted["rotary"]}, torch.device("cpu"), (torch.float32,), True)
    r = compare(target, "tiny-chatglm2", torch.float32, new_tokens=2)
    assert not r.ok and "logits differ" in r.detail
    assert compare(target, "tiny-glm-130b", torch.float32, new_tokens=2).ok  # neox models are unaffected


PLANTED = '''
"""A GPU backend whose Triton kernels carry planted bugs (run with TRITON_INTERPRET=1)."""
import torch
from glm_runtime.backends.cuda.plugin import CUDABackend
from glm_runtime.backends.triton import norms, rotary
from glm_runtime.backends.triton.launch import pow2
from glm_runtime.core.ops import Kernel

HALF = frozenset({torch.float16, torch.float32})


def rms_norm_off_by_one(x, weight, eps):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n = x2.shape[1]
    y = torch.empty_like(x2)
    norms._rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), n - 1, float(eps),
                                           BLOCK=pow2(n))
    return y.view(x.shape)


def rotary_wrong_layout(x, cos, sin, layout):
    from glm_runtime.backends.triton.tuning import RotaryCfg
    return rotary.rotary(x, cos, sin, "neox" if layout == "interleaved" else layout, RotaryCfg())


class Planted(CUDABackend):
    name = "planted"

    def kernels(self):
        k = super().kernels()
        k["rms_norm"] = Kernel(rms_norm_off_by_one, HALF, "planted off-by-one")
        k["rotary"] = Kernel(rotary_wrong_layout, HALF, "planted wrong layout")
        return k
'''


@pytest.mark.slow
def test_kit_fails_triton_kernels_planted_with_off_by_one_and_wrong_layout(tmp_path):
    (tmp_path / "planted_backend.py").write_text(textwrap.dedent(PLANTED))
    r = kit("--glm-backend-object", "planted_backend:Planted", "--glm-host", "--glm-dtypes", "fp16",
            "-k", "test_op and (rms_norm or rotary or glu)",
            env={"TRITON_INTERPRET": "1", "PYTHONPATH": str(tmp_path)})
    out = r.stdout
    assert r.returncode == 1, out[-3000:] + r.stderr[-2000:]
    failed = {line.split("::")[1].split(" ")[0] for line in out.splitlines() if line.startswith("FAILED")}
    assert any("rms_norm-24" in f for f in failed) and any("rms_norm-100" in f for f in failed)
    assert any("rotary-interleaved-partial" in f for f in failed)
    assert any("rotary-interleaved-full" in f for f in failed)
    assert not any("neox" in f or "glu" in f for f in failed), failed  # untouched kernels still pass
    assert "4 failed" in out  # 2 rms_norm cases + 2 interleaved rotary cases


def test_plugin_is_inert_without_a_backend_option(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_x():\n    assert True\n")
    r = kit(str(tmp_path / "test_x.py"), cwd=tmp_path)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr


def test_unknown_or_unavailable_backend_is_a_clear_error():
    from glm_runtime.conformance.target import resolve
    from glm_runtime.core.errors import BackendError

    with pytest.raises(BackendError, match="unknown backend 'nonesuch'"):
        resolve("nonesuch", None, False, None)
    with pytest.raises(BackendError, match="unavailable here .*built without CUDA.*--glm-host"):
        resolve("cuda", None, False, None)
    with pytest.raises(BackendError, match="module:attribute"):
        resolve(None, "no_colon", False, None)
