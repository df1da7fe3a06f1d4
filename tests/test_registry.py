"""Backend discovery through entry points, selection precedence, API-version gate,
fallback warnings, strict mode and the op report."""
from __future__ import annotations

import importlib.metadata
import logging
import sys
import types

import pytest
import torch

from glm_runtime.core.errors import BackendError
from glm_runtime.core.ops import Kernel, OpTable
from glm_runtime.core.ops import table as op_table
from glm_runtime.core.registry import Backend, Probe, hookimpl, selection


class FakeEP:
    """Stands in for an importlib.metadata.EntryPoint of another installed package."""

    def __init__(self, name, module):
        self.name, self.value, self._module = name, module.__name__, module

    def load(self):
        return self._module


def plugin_module(name, backends=(), extra=None, fail=False):
    mod = types.ModuleType(name)
    if fail:
        def glm_backends():
            raise ImportError("libfoo.so: cannot open shared object file")
    else:
        def glm_backends():
            return list(backends)
    mod.glm_backends = hookimpl(glm_backends)
    if extra is not None:
        def glm_extra_kernels(backend_name):
            return extra.get(backend_name)
        mod.glm_extra_kernels = hookimpl(glm_extra_kernels)
    sys.modules[name] = mod
    return mod


class Toy(Backend):
    device_type = "cpu"

    def __init__(self, name, available=True, score=5, api_version=None, kernels=None):
        self.name, self._avail, self._score = name, available, score
        if api_version is not None:
            self.api_version = api_version
        self._kernels = kernels or {}

    def probe(self):
        return Probe(self._avail, "ok" if self._avail else "no device visible", self._score)

    def kernels(self):
        return self._kernels


@pytest.fixture
def plugins(monkeypatch):
    """Install extra fake entry points next to the real ones; rediscover afterwards."""
    real = importlib.metadata.entry_points
    extra = []

    def eps(group=None, **kw):
        found = list(real(group=group, **kw))
        return found + extra if group == selection.ENTRY_POINT_GROUP else found

    monkeypatch.setattr(importlib.metadata, "entry_points", eps)
    monkeypatch.delenv("GLM_BACKEND", raising=False)
    yield extra
    monkeypatch.undo()
    selection.discover(refresh=True)


def test_cpu_found_through_its_entry_point():
    found = selection.discover(refresh=True)
    assert found["cpu"].available
    assert "entry point 'cpu'" in found["cpu"].source
    assert selection.get_backend("cpu").name == "cpu"


def test_precedence_flag_env_config_auto(plugins, monkeypatch):
    plugins.append(FakeEP("toys", plugin_module("toys", [Toy("fast", score=50), Toy("slow", score=1)])))
    selection.discover(refresh=True)
    assert selection.get_backend(None).name == "fast"  # auto: highest score
    assert selection.get_backend(None, config_value="slow").name == "slow"
    monkeypatch.setenv("GLM_BACKEND", "cpu")
    assert selection.get_backend(None, config_value="slow").name == "cpu"
    assert selection.get_backend("slow", config_value="fast").name == "slow"


def test_unavailable_and_unknown_explain(plugins):
    plugins.append(FakeEP("gone", plugin_module("gone", [Toy("ghost", available=False)])))
    plugins.append(FakeEP("broken", plugin_module("broken", fail=True)))
    selection.discover(refresh=True)
    with pytest.raises(BackendError, match="backend 'ghost' is unavailable: no device visible"):
        selection.get_backend("ghost")
    with pytest.raises(BackendError) as e:
        selection.get_backend("nope")
    msg = str(e.value)
    assert "cpu (available)" in msg and "ghost (unavailable: no device visible)" in msg
    assert "broken (unavailable: glm_backends() failed: ImportError: libfoo.so" in msg


def test_api_version_is_checked_at_discovery(plugins):
    plugins.append(FakeEP("old", plugin_module("old", [Toy("legacy", api_version=0)])))
    found = selection.discover(refresh=True)
    assert not found["legacy"].available
    assert "API version 0" in found["legacy"].probe.reason


def test_extra_kernels_hook_contributes_to_a_backend(plugins):
    k = Kernel(lambda x, w, b=None: torch.nn.functional.linear(x, w, b), frozenset({torch.float32}), "tuned")
    plugins.append(FakeEP("addon", plugin_module("addon", extra={"cpu": {"linear": k}})))
    selection.discover(refresh=True)
    assert selection.extra_kernels("cpu")["linear"] is k


def test_fallback_warns_once_and_strict_fails(caplog):
    op_table._warned.clear()
    partial = {"linear": Kernel(lambda *a: None)}
    with caplog.at_level(logging.WARNING, logger="glm_runtime.core.ops"):
        t = OpTable("toy", partial, torch.float32, strict=False, required=("linear", "attention"))
        OpTable("toy", partial, torch.float32, strict=False, required=("linear", "attention"))
    warnings = [r.message for r in caplog.records if "attention" in r.message]
    assert len(warnings) == 1 and "using the reference" in warnings[0]
    rows = {p.op: p for p in t.report()}
    assert rows["linear"].provider == "toy" and rows["attention"].provider == "reference"
    with pytest.raises(BackendError, match="strict ops.*attention"):
        OpTable("toy", partial, torch.float32, strict=True, required=("linear", "attention"))


def test_kernel_without_the_dtype_falls_back(caplog):
    k = {"rms_norm": Kernel(lambda *a: None, frozenset({torch.float16}))}
    with pytest.raises(BackendError, match="rms_norm .kernel does not support torch.float32"):
        OpTable("toy", k, torch.float32, strict=True, required=("rms_norm",))


def test_unknown_op_is_rejected():
    with pytest.raises(BackendError, match="unknown op"):
        OpTable("toy", {"softmax_v2": Kernel(lambda: None)}, torch.float32)


def test_cpu_backend_needs_no_fallback_in_strict_mode():
    from glm_runtime.core.build import op_table as build_op_table
    from glm_runtime.core.presets import preset

    for name in ("tiny-glm-4", "tiny-glm-130b", "tiny-chatglm-6b"):
        t = build_op_table(selection.get_backend("cpu"), preset(name), torch.float32, strict=True)
        assert all(p.provider == "cpu" for p in t.report())


def test_backends_command_lists_cpu(capsys):
    from glm_runtime.cli.main import main

    assert main(["backends", "--ops"]) == 0
    out = capsys.readouterr().out
    assert "cpu: available" in out and "distributed backend gloo" in out
    assert "attention" in out and "grouped-query matmul attention" in out
