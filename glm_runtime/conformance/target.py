"""Which backend the kit checks, on which device, in which dtypes."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from glm_runtime.core.errors import BackendError
from glm_runtime.core.ops.contract import Kernel
from glm_runtime.core.registry import Backend, discover, kernels_for

KIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Target:
    backend: Backend
    kernels: dict[str, Kernel]
    device: torch.device
    dtypes: tuple
    host: bool  # kernels run on host tensors (interpreter / fake vendor module)

    @property
    def label(self) -> str:
        return f"{self.backend.name}{' (host)' if self.host else ''} on {self.device}"


class DeviceView(Backend):
    """The target backend as the model builder sees it: fixed device and compute dtype."""

    def __init__(self, inner: Backend, device: torch.device, dtype: torch.dtype, kernels: dict[str, Kernel]):
        self.inner, self._device, self._dtype, self._kernels = inner, device, dtype, kernels
        self.name = inner.name
        self.device_type = device.type
        self.dist_backend = inner.dist_backend

    def probe(self):
        return self.inner.probe()

    def kernels(self):
        return dict(self._kernels)  # exactly the kernels under test

    def compute_dtype(self, storage_dtype):
        return self._dtype

    def prepare_parameter(self, name, tensor):
        return self.inner.prepare_parameter(name, tensor)

    def device(self, local_rank: int = 0):
        return self._device


def load_object(spec: str) -> Backend:
    """``pkg.module:Name`` -> a Backend (a class is instantiated, a factory called)."""
    mod, _, attr = spec.partition(":")
    if not attr:
        raise BackendError(f"--glm-backend-object wants 'module:attribute', got {spec!r}")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise BackendError(f"cannot load backend object {spec!r}: {e}") from None
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend)):
        obj = obj()
    if not isinstance(obj, Backend):
        raise BackendError(f"{spec!r} is not a glm_runtime Backend")
    return obj


def resolve(name: str | None, obj: str | None, host: bool, dtypes: str | None) -> Target:
    if obj:
        b = load_object(obj)
    else:
        found = discover()
        hits = [d for d in found.values() if d.name == name or (d.backend and name in d.backend.aliases)]
        if not hits:
            raise BackendError(f"unknown backend {name!r}; installed: {', '.join(sorted(found))}")
        d = hits[0]
        if d.backend is None:
            raise BackendError(f"backend {name!r} did not load: {d.probe.reason}")
        if not host and not d.available:
            raise BackendError(f"backend {name!r} is unavailable here ({d.probe.reason}); "
                               f"--glm-host runs its kernels on host tensors where they can run there")
        b = d.backend
    kernels = b.kernels() if obj else kernels_for(b)
    device = torch.device("cpu") if host else b.device(0)
    if dtypes:
        table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        try:
            dts = tuple(table[t.strip()] for t in dtypes.split(","))
        except KeyError as e:
            raise BackendError(f"--glm-dtypes: unknown dtype {e}") from None
    else:
        have = set().union(*(k.dtypes for k in kernels.values())) if kernels else {torch.float32}
        dts = tuple(dt for dt in KIT_DTYPES if dt in have)
    return Target(b, kernels, device, dts, host)
