"""The CUDA, ROCm and Hygon DCU backends: probes, capabilities, tuning choice, CLI listing.

The torch here is a CPU build, so the real probes must say exactly that. The other states
(a CUDA build with no device, a HIP build on AMD or on a DCU with DTK) are reached by
substituting the few torch facts the probes read; capabilities are checked against
substituted device properties with the fields torch documents.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from glm_runtime.backends.cuda.plugin import CUDABackend
from glm_runtime.backends.rocm import plugin as rocm_plugin
from glm_runtime.backends.rocm.plugin import DCUBackend, ROCmBackend
from glm_runtime.backends.triton.tuning import lookup
from glm_runtime.core.errors import BackendError


def test_real_probes_on_this_cpu_build_give_the_true_reason():
    assert torch.version.cuda is None and torch.version.hip is None  # this machine's torch
    c, r, d = CUDABackend().probe(), ROCmBackend().probe(), DCUBackend().probe()
    assert not c.available and "was built without CUDA (a CPU-only build)" in c.reason
    assert not r.available and "built without ROCm/HIP" in r.reason and "AMD ROCm" in r.reason
    assert not d.available and "Hygon DTK" in d.reason
    assert not torch.cuda.is_initialized()


def test_probe_and_kernel_table_never_initialise_the_device():
    for b in (CUDABackend(), ROCmBackend(), DCUBackend()):
        b.probe()
        assert {"attention", "rotary", "quantized_linear", "rms_norm"} <= set(b.kernels())
        assert not torch.cuda.is_initialized()


def test_identity_facts():
    c, r, d = CUDABackend(), ROCmBackend(), DCUBackend()
    assert (c.dist_backend, r.dist_backend, d.dist_backend) == ("nccl", "nccl", "nccl")  # RCCL under the name
    assert c.visible_devices_env == "CUDA_VISIBLE_DEVICES"
    assert r.visible_devices_env == d.visible_devices_env == "HIP_VISIBLE_DEVICES"
    assert (c.warp_size, r.warp_size, d.warp_size) == (32, 64, 64)
    assert "dcu" == d.name and "hygon" in d.aliases and d.platform == "dcu"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Substitute the torch facts a probe reads: build strings and the device count."""
    def setup(cuda=None, hip=None, count=0, props=None):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        if props is not None:
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (props[i].major, props[i].minor))
    return setup


def test_cuda_build_without_devices_names_the_visible_devices_variable(fake_gpu, monkeypatch):
    fake_gpu(cuda="12.4", count=0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    p = CUDABackend().probe()
    assert not p.available and "CUDA 12.4" in p.reason and "CUDA_VISIBLE_DEVICES=''" in p.reason
    assert "ROCm/HIP build" not in p.reason


def test_hip_build_redirects_cuda_to_rocm_and_dcu(fake_gpu):
    fake_gpu(hip="6.2.41133", count=2)
    p = CUDABackend().probe()
    assert not p.available and "is a ROCm/HIP build" in p.reason and "--backend dcu" in p.reason
    assert ROCmBackend().probe().available


def test_dcu_needs_dtk_and_outranks_rocm_there(fake_gpu, monkeypatch, tmp_path):
    fake_gpu(hip="5.7.24164", count=1)
    for v in ("DTK_HOME", "ROCM_PATH"):
        monkeypatch.delenv(v, raising=False)
    # a machine with a real DTK at the default place must not see it here
    monkeypatch.setattr(rocm_plugin, "DEFAULT_DTK", str(tmp_path / "no-dtk"))
    p = DCUBackend().probe()
    assert not p.available and "no Hygon DTK install was found" in p.reason and "--backend rocm" in p.reason
    dtk = tmp_path / "dtk-24.04"
    (dtk / ".info").mkdir(parents=True)
    (dtk / ".info" / "version").write_text("24.04\n")
    monkeypatch.setenv("DTK_HOME", str(dtk))
    pd, pr = DCUBackend().probe(), ROCmBackend().probe()
    assert pd.available and pr.available and pd.score > pr.score
    assert any("24.04" in c.detail for c in DCUBackend().driver_checks())


def _props(name, arch=None, major=0, minor=0, warp=None):
    return types.SimpleNamespace(name=name, gcnArchName=arch, major=major, minor=minor, total_memory=64 << 30,
                                 multi_processor_count=120, warp_size=warp)


def test_capabilities_per_device(fake_gpu, monkeypatch, tmp_path):
    fake_gpu(cuda="12.4", count=2, props=[_props("NVIDIA H100 80GB HBM3", major=9, minor=0, warp=32),
                                          _props("Tesla V100-SXM2-32GB", major=7, minor=0, warp=32)])
    caps = CUDABackend().capabilities()
    assert caps.arch == "sm_90" and torch.bfloat16 in caps.compute_dtypes
    assert caps.extra["tuning"] == "cuda/sm_90" and caps.extra["peak_gbps"] == 3350.0
    v100 = CUDABackend().capabilities(index=1)
    assert v100.arch == "sm_70" and torch.bfloat16 not in v100.compute_dtypes
    assert CUDABackend().compute_dtype(torch.bfloat16) == torch.bfloat16  # current device 0 (sm_90) computes bf16

    dtk = tmp_path / "dtk"
    dtk.mkdir()
    monkeypatch.setenv("DTK_HOME", str(dtk))
    fake_gpu(hip="5.7", count=2, props=[_props("Z100L", arch="gfx906:sramecc+:xnack-", warp=64),
                                        _props("K100_AI", arch="gfx928:sramecc+:xnack-", warp=64)])
    z = DCUBackend().capabilities()
    assert z.arch == "gfx906" and z.warp_size == 64 and torch.bfloat16 not in z.compute_dtypes
    assert z.extra["tuning"] == "dcu/gfx906" and z.extra["known_dcu_arch"]
    k = DCUBackend().capabilities(index=1)
    assert k.arch == "gfx928" and torch.bfloat16 in k.compute_dtypes and k.extra["tuning"] == "dcu/gfx928"
    assert ROCmBackend().capabilities().extra["tuning"] == "rocm/default"  # gfx906 is not in the AMD table


def test_tuning_lookup():
    assert lookup("dcu", "gfx928:sramecc+:xnack-").arch == "gfx928"
    assert lookup("dcu", "gfx936").arch == "default"
    assert lookup("rocm", "gfx942").matmul.num_stages <= 2  # the AMD backend's pipelining depth
    assert lookup("cuda", "sm_90").matmul.block_m == 128
    assert lookup("cuda", None).arch == "default"


def test_forced_arch_selects_the_table(monkeypatch):
    monkeypatch.setenv("GLM_TRITON_ARCH", "gfx906")
    notes = {k.note for k in DCUBackend().kernels().values()}
    assert any("[dcu/gfx906]" in n for n in notes)


def test_selecting_an_unavailable_gpu_backend_says_why():
    from glm_runtime.core.registry import get_backend

    with pytest.raises(BackendError, match="built without CUDA"):
        get_backend("cuda")
    with pytest.raises(BackendError, match="Hygon DTK"):
        get_backend("hygon")


def test_glmrt_backends_lists_every_backend_with_its_reason():
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    r = subprocess.run([sys.executable, "-m", "glm_runtime.cli.main", "backends"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = {line.split(":")[0]: line for line in r.stdout.splitlines() if not line.startswith(" ")}
    assert lines["cpu"].startswith("cpu: available")
    assert "unavailable" in lines["cuda"] and "built without CUDA" in lines["cuda"]
    assert "unavailable" in lines["rocm"] and "built without ROCm/HIP" in lines["rocm"]
    assert "unavailable" in lines["dcu"]
    assert "unavailable" in lines["npu"] and "torch_npu is not installed" in lines["npu"]


def test_glmrt_doctor_reports_versions_and_benchmarks_cpu():
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    r = subprocess.run([sys.executable, "-m", "glm_runtime.cli.main", "doctor", "--backend", "cpu", "--bench",
                        "--bench-size", "tiny", "--bench-tokens", "8", "--bench-iters", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torch device-backend auto-load: plain `import torch` works" in r.stdout
    assert "op benchmark on cpu" in r.stdout
    for op in ("rms_norm", "attention", "quantized_linear"):
        assert any(line.strip().startswith(op) and "GB/s" in line for line in r.stdout.splitlines()), op


def test_npu_doctor_names_what_is_missing():
    from glm_runtime.backends.npu.plugin import NPUBackend

    checks = {c.name: c for c in NPUBackend().doctor()}
    assert not checks["torch-npu"].ok and checks["torch-npu"].detail == "not installed"
    assert not checks["CANN toolkit"].ok and "ASCEND_TOOLKIT_HOME" in checks["CANN toolkit"].detail
