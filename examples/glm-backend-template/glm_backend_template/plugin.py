"""The plugin: one Backend subclass and the ``glm_backends`` hook that returns it.

Porting to a new device means changing, in this file:

* the identity: ``name`` (what ``--backend`` takes), ``device_type`` (the torch device
  string of your tensors, e.g. the name your torch extension registered), ``dist_backend``
  (the torch.distributed backend your collectives library registers),
  ``visible_devices_env`` and ``forward_env_prefixes`` (what a launcher must pass on);
* ``probe()``: import your torch extension and count devices *without* opening one, and
  return the exact reason when something is missing;
* ``capabilities()``: arch name, the dtypes you compute in, what your kernels cover;
* ``kernels()``: which ops of the contract you implement, for which dtypes.

Optional hooks you may add, each with its default on :class:`glm_runtime.Backend`:
``compute_dtype``, ``prepare_parameter`` (the memory layout your kernels want for a loaded
weight), ``setup_process`` / ``synchronize`` (default ``torch.accelerator``), ``capture``
(record a fixed-shape decode step for replay; default: none), ``doctor``, and
``runs_own_graph`` + ``load_runtime`` for a backend that runs a whole graph of its own.

Everything comes from the stable plugin API, ``glm_runtime``'s top-level names.
"""
from __future__ import annotations

import os

import torch

from glm_runtime import Backend, Capabilities, Check, Kernel, Probe, hookimpl

from . import kernels

FP32 = frozenset({torch.float32})


class TemplateBackend(Backend):
    name = "template"
    description = "template plugin: explicit PyTorch kernels on the host CPU (copy me)"
    device_type = "cpu"          # your device: e.g. the string your torch extension registers
    dist_backend = "gloo"        # your collectives: the name registered with torch.distributed
    visible_devices_env = None   # e.g. "MYCHIP_VISIBLE_DEVICES"
    forward_env_prefixes = ()    # e.g. ("MYCHIP_",)

    def probe(self) -> Probe:
        # A real plugin: try the import of its torch extension here and return
        # Probe(False, "<module> import failed with ...") on failure; count devices through
        # a call that does not initialise the runtime.
        return Probe(True, f"template kernels on the host CPU ({os.cpu_count()} threads)", score=1,
                     devices=["cpu"])

    def capabilities(self) -> Capabilities:
        return Capabilities(arch="host", compute_dtypes=(torch.float32,), extra={"kernels": sorted(self.kernels())})

    def kernels(self) -> dict[str, Kernel]:
        return {op: Kernel(getattr(kernels, op), FP32, f"template {op}") for op in kernels.OPS}

    def doctor(self) -> list[Check]:
        x, w = torch.randn(2, 8), torch.rand(8)
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        ok = torch.allclose(kernels.rms_norm(x, w, 1e-6), want, atol=1e-6, rtol=1e-6)
        return [Check("torch", True, torch.__version__), Check("template smoke", ok, "rms_norm against the reference")]


@hookimpl
def glm_backends():
    return [TemplateBackend()]
