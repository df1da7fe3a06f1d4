"""The Backend base class: everything core code may ask of a piece of hardware.

Core code never names a vendor. It asks the selected backend for its torch device type,
its capabilities, its kernels and its distributed backend name. A plugin subclasses
:class:`Backend` and overrides what differs from the defaults, which use
``torch.accelerator`` where a device runtime is involved.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..ops.contract import Kernel
from .hookspecs import API_VERSION


@dataclass
class Probe:
    """Result of :meth:`Backend.probe`: availability, why, and the ``auto`` score."""

    available: bool
    reason: str
    score: int = 0
    devices: list[str] = field(default_factory=list)


@dataclass
class Capabilities:
    """What a backend can do, stated by the backend rather than guessed from its name."""

    arch: str = ""
    compute_dtypes: tuple = (torch.float32,)
    storage_dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    fp16_matmul: bool = False
    bf16_matmul: bool = False
    int8_weight_kernel: bool = False
    int4_weight_kernel: bool = False
    fused_attention_fp32_softmax: bool = False
    warp_size: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Check:
    """One line of ``glmrt doctor``: a named check, passed or not, with detail."""

    name: str
    ok: bool
    detail: str


class Backend:
    """Base class of backend plugins. Subclasses set the class attributes and override
    :meth:`probe` and :meth:`kernels` at least.

    Attributes:
        name: the name users select (``--backend NAME``).
        aliases: other accepted names (``dcu`` for the ROCm backend on Hygon DCU, say).
        api_version: the plugin API version this backend implements.
        device_type: the torch device type string of its tensors.
        dist_backend: the torch.distributed backend used on this device.
        visible_devices_env: environment variable that restricts visible devices, if any.
        forward_env_prefixes: environment variable prefixes a launcher must forward.
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    api_version: int = API_VERSION
    device_type: str = "cpu"
    dist_backend: str = "gloo"
    visible_devices_env: str | None = None
    forward_env_prefixes: tuple[str, ...] = ()
    description: str = ""

    # ----------------------------------------------------------- discovery
    def probe(self) -> Probe:
        """Is the backend usable here, and why not? Must not initialise a device runtime."""
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def kernels(self) -> dict[str, Kernel]:
        """The backend's implementations of ops of the contract ({op name: Kernel})."""
        return {}

    # ------------------------------------------------------------- numerics
    def compute_dtype(self, storage_dtype: torch.dtype) -> torch.dtype:
        """The dtype weights of ``storage_dtype`` are computed in on this backend."""
        caps = self.capabilities()
        return storage_dtype if storage_dtype in caps.compute_dtypes else torch.float32

    def prepare_parameter(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Give a loaded parameter the memory layout this backend's kernels want.

        Called once per checkpoint key at load, after the cast to the compute dtype. The
        result must have the same shape and values (a differently strided view is fine:
        checkpoints are written from ``.contiguous()`` copies).
        """
        return tensor

    # -------------------------------------------------------------- runtime
    def device(self, local_rank: int = 0) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, local_rank)

    def setup_process(self, local_rank: int) -> torch.device:
        """Bind this process to its device (called once per process by the bootstrap)."""
        dev = self.device(local_rank)
        if dev.type != "cpu":
            torch.accelerator.set_device_index(dev.index)
        return dev

    def synchronize(self) -> None:
        if self.device_type != "cpu":
            torch.accelerator.synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def memory_info(self) -> dict:
        """Bytes free/total on this backend's device (host memory for cpu)."""
        try:
            pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            avail = os.sysconf("SC_AVPHYS_PAGES")
            return {"total": pages * size, "free": avail * size}
        except (ValueError, OSError):
            return {}

    def doctor(self) -> list[Check]:
        """Versions and smoke checks, shown by ``glmrt doctor``."""
        return [Check("torch", True, torch.__version__)]

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
