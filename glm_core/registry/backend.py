"""The Backend base class: everything core code may ask of a piece of hardware.

Core code never names a vendor. It asks the selected backend for its torch device type,
its capabilities, its kernels and its distributed backend name. A plugin subclasses
:class:`Backend` and overrides what differs from the defaults, which use
``torch.accelerator`` where a device runtime is involved.

Everything here is used by the runtime; a plugin author implements what this class shows
and nothing else. Required: :attr:`name` and :meth:`probe`. Optional, with the default
stated on each: the other attributes, :meth:`capabilities`, :meth:`kernels`,
:meth:`compute_dtype`, :meth:`prepare_parameter`, the runtime calls, :meth:`capture`,
:meth:`doctor`, and :meth:`load_runtime` for a backend that runs a graph of its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

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

    #: architecture name as the vendor spells it (``sm_90``, ``gfx928``, ``x86_64``): shown by
    #: ``glmrt backends`` and used to pick tuning tables
    arch: str = ""
    #: dtypes this backend computes in; a checkpoint stored in another dtype is computed in
    #: fp32 (:meth:`Backend.compute_dtype`; training refuses a precision not listed here).
    #: Which *ops* have kernels, per dtype, is what :meth:`Backend.kernels` says.
    compute_dtypes: tuple = (torch.float32,)
    #: SIMD width of the device (32 on NVIDIA, 64 on AMD/Hygon), shown by ``glmrt backends``
    warp_size: int | None = None
    #: anything else worth showing (``glmrt backends``, ``glmrt doctor``): devices, tuning
    #: table, ``peak_gbps`` / ``peak_tflops_fp16`` for the op benchmarks
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
        description: one line for ``glmrt backends``.
        runs_own_graph: True for a backend that runs a whole graph of its own (an exported
            model) instead of the GLM graph on its kernels; it implements
            :meth:`load_runtime`, and tensor/pipeline parallelism is not offered on it.
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    api_version: int = API_VERSION
    device_type: str = "cpu"
    dist_backend: str = "gloo"
    visible_devices_env: str | None = None
    forward_env_prefixes: tuple[str, ...] = ()
    description: str = ""
    runs_own_graph: bool = False

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

    def load_runtime(self, path: str | os.PathLike, *, strict_ops: bool | None = None, progress: bool = False,
                     **options):
        """Load a directory in this backend's own format (when :attr:`runs_own_graph`).

        Returns a runner with :class:`~glm_runtime.core.model.GLMModel`'s forward signature
        and its ``config``, ``ops`` (whose ``format_report()`` is the op report),
        ``dtype``, ``device``, ``new_cache(batch, max_len)`` and ``tokenizer_path``, so
        ``load_model``, masks, generation and sampling are the same code on every backend.
        ``options`` are the keyword arguments a user passed to ``load_model``. The default
        (a backend that runs the GLM graph) never calls this.
        """
        raise NotImplementedError(f"backend {self.name!r} runs the GLM graph on its kernels; it has no runtime "
                                  "format of its own")

    # -------------------------------------------------------------- runtime
    def device(self, local_rank: int = 0) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, local_rank)

    def setup_process(self, local_rank: int) -> torch.device:
        """Bind this process to its device (called once per process by the bootstrap);
        default: ``torch.accelerator.set_device_index``."""
        dev = self.device(local_rank)
        if dev.type != "cpu":
            torch.accelerator.set_device_index(dev.index)
        return dev

    def synchronize(self) -> None:
        """Wait for the device's queued work (op benchmarks time with it); default:
        ``torch.accelerator.synchronize``."""
        if self.device_type != "cpu":
            torch.accelerator.synchronize()

    def capture(self, fn: Callable, example_inputs: tuple[torch.Tensor, ...]) -> Callable | None:
        """Record ``fn`` for replay, or None: this backend does not capture (the default).

        ``fn`` takes tensors shaped like ``example_inputs`` and returns a tensor (or a tuple
        of them); it does device work only (no host synchronisation, the same shapes at
        every call). A backend that records returns a callable with ``fn``'s signature and
        results, normally a :class:`~glm_runtime.core.registry.capture.StaticCall`: its
        arguments are copied into the buffers the record reads, and its results are the
        same tensors at every call, overwritten by the next one. Recording may run ``fn``
        a few times first (warm-up), side effects included, so the caller passes a
        function whose repetition is harmless. :class:`~glm_runtime.core.generation.DecodeBatch`
        captures its fixed-shape decode step through this hook.

        Why None by default: a record pays only where launching work costs the host time
        comparable to the work itself (a GPU driven by a Python loop). A host CPU backend
        runs each op as it is called, and a device without a graph facility has nothing to
        record; callers then run ``fn`` as it is, with the same results.
        """
        return None

    def doctor(self) -> list[Check]:
        """Versions and smoke checks, shown by ``glmrt doctor``."""
        return [Check("torch", True, torch.__version__)]

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
