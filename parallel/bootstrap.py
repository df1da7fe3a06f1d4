"""Bootstrap of a multi-process job: who am I, where is the rendezvous, and the process group.

Discovery order of rank, world size and local rank (first match wins):

1. explicit arguments (``init(rank=..., world_size=...)``);
2. torchrun / torch elastic variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
   (with ``MASTER_ADDR``/``MASTER_PORT`` for the store);
3. MPI through mpi4py, when an MPI launcher is detected (``PMI_RANK``, ``PMIX_RANK``,
   ``OMPI_COMM_WORLD_RANK`` or ``MPI_LOCALRANKID`` set) and mpi4py imports: ``COMM_WORLD``
   gives rank and size, and the local rank comes from one collective,
   ``Split_type(COMM_TYPE_SHARED)`` (not an all-gather of host names);
4. Open MPI variables without mpi4py: ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK``;
5. MPICH / Intel MPI (PMI) variables: ``PMI_RANK/PMI_SIZE`` with ``MPI_LOCALRANKID``
   (or ``PALS_LOCAL_RANKID``), and PMIx's ``PMIX_RANK``;
6. Slurm: ``SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID`` (``srun`` without MPI; a
   batch script inside an allocation has no step and is a single process);
7. nothing: a single process.

Rendezvous. With MPI, rank 0 opens torch's libuv ``TCPStore`` on port 0 (the kernel picks
a free port, so there is no pick-then-close race) on the address of the interface named
by ``GLM_BOOTSTRAP_IFACE`` (or ``GLM_BOOTSTRAP_ADDR``, or the ``iface=`` argument; the
loopback when every rank is on one node; else the address the host name resolves to),
and broadcasts host and port over MPI. Without MPI the store is at
``MASTER_ADDR:MASTER_PORT`` (torchrun's agent store when ``TORCHELASTIC_USE_AGENT_STORE``
is set, the ``glmrt launch --launcher local`` parent when ``GLM_AGENT_STORE=1``, else rank 0
serves it). Every rank then checks in with one atomic ``add`` and waits for the last
arrival's key (O(N) store messages), so a missing rank is reported by count
(``k of N ranks arrived``) instead of hanging. Timeouts grow with the world size
(:func:`timeout_for`).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch.distributed as dist
from torch.distributed import TCPStore

from glm_runtime.core.registry import Backend, get_backend

from .launchenv import HUB_ENV, DistributedError, LaunchInfo, discover, env_int, under_launcher  # noqa: F401


def timeout_for(world_size: int, base_s: float | None = None) -> datetime.timedelta:
    """Collective and store timeout: ``base + 20 ms x world_size``.

    The store's rank 0 serves every check-in and every ``new_group`` exchange one request at
    a time, so the time a healthy start needs grows linearly with the number of ranks (about
    4 s more at 10K ranks per store round in our measurements, docs/scaling.md); 20 ms a
    rank leaves a wide margin. ``base`` is ``GLM_DIST_TIMEOUT`` seconds, default 120.
    """
    if base_s is None:
        base_s = float(os.environ.get("GLM_DIST_TIMEOUT", "120"))
    return datetime.timedelta(seconds=base_s + 0.02 * world_size)


def interface_address(name: str) -> str:
    """IPv4 address of a network interface (Linux ``SIOCGIFADDR``)."""
    names = [n for _, n in socket.if_nameindex()]
    if name not in names:
        raise DistributedError(f"network interface {name!r} not found (have: {', '.join(names)}); "
                               "set GLM_BOOTSTRAP_IFACE to one of them")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
    except OSError as e:
        raise DistributedError(f"network interface {name!r} has no IPv4 address ({e})") from None
    finally:
        s.close()
    return socket.inet_ntoa(packed[20:24])


def host_address(all_local: bool, iface: str | None = None) -> str:
    """The address this host serves a job's rendezvous on (configured, not guessed from the
    first address ``hostname -I`` prints): ``GLM_BOOTSTRAP_IFACE``'s (or ``iface``'s),
    else ``GLM_BOOTSTRAP_ADDR``, else the loopback when every rank runs here, else the
    address the host name resolves to."""
    iface = iface or os.environ.get("GLM_BOOTSTRAP_IFACE")
    if iface:
        return interface_address(iface)
    if os.environ.get("GLM_BOOTSTRAP_ADDR"):
        return os.environ["GLM_BOOTSTRAP_ADDR"]
    if all_local:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(socket.getfqdn())
    except OSError as e:
        raise DistributedError(f"cannot resolve this host's name ({e}); set GLM_BOOTSTRAP_IFACE") from None


def store_address(info: LaunchInfo, iface: str | None = None) -> str:
    """The address rank 0 serves the store on (:func:`host_address`)."""
    return host_address(info.all_local, iface)


@dataclass
class Timings:
    """Seconds spent in each start-up phase on this rank."""

    discover: float = 0.0
    store: float = 0.0
    arrival: float = 0.0
    process_group: float = 0.0
    subgroups: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("discover", "store", "arrival", "process_group", "subgroups")}
        d.update(self.extra)
        return d


def _tcp_store(host: str, port: int, world: int, master: bool, timeout: datetime.timedelta):
    return TCPStore(host, port, world, master, timeout=timeout, wait_for_workers=False, use_libuv=True)


def open_store(info: LaunchInfo, timeout: datetime.timedelta, iface: str | None = None,
               env: Mapping[str, str] | None = None):
    """The rendezvous store for this job (module docstring)."""
    env = os.environ if env is None else env
    if info.comm is not None:
        endpoint, err, store = None, None, None
        if info.rank == 0:
            try:
                host = store_address(info, iface)
                store = _tcp_store(host, 0, info.world_size, True, timeout)
                endpoint = (host, store.port)
            except Exception as e:  # noqa: BLE001 - every rank must learn why rank 0 failed
                err = f"rank 0 could not open the rendezvous store: {e}"
        endpoint, err = info.comm.bcast((endpoint, err), root=0)
        if err:
            raise DistributedError(err)
        if store is None:
            try:
                store = _tcp_store(endpoint[0], endpoint[1], info.world_size, False, timeout)
            except Exception as e:  # noqa: BLE001
                raise DistributedError(f"rank {info.rank}: cannot reach the rendezvous store at "
                                       f"{endpoint[0]}:{endpoint[1]} ({e}); check GLM_BOOTSTRAP_IFACE") from None
        return store
    host, port = env.get("MASTER_ADDR"), env_int(env, "MASTER_PORT")
    if info.world_size > 1 and (not host or port is None):
        raise DistributedError(f"launched by {info.source} without MPI: set MASTER_ADDR and MASTER_PORT, or "
                               "install mpi4py (pip install glm-runtime[mpi]) so rank 0 can publish the store")
    if info.world_size == 1 and (not host or port is None):
        return _tcp_store("127.0.0.1", 0, 1, True, timeout)
    agent = (env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" or env.get("GLM_AGENT_STORE") == "1")
    master = info.rank == 0 and not agent
    try:
        return _tcp_store(host, port, info.world_size, master, timeout)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"rank {info.rank}: rendezvous store at {host}:{port} failed: {e}") from None


def wait_for_all(store, info: LaunchInfo, timeout: datetime.timedelta, key: str = "glm/arrived") -> None:
    """Check in and wait for every rank (one ``add`` and one ``wait`` per rank)."""
    n = store.add(key, 1)
    if n == info.world_size:
        store.set(key + "/all", b"1")
    try:
        store.wait([key + "/all"], timeout)
    except Exception:  # noqa: BLE001 - torch raises several types for a timed-out wait
        arrived = store.add(key, 0)
        raise DistributedError(f"rendezvous timed out after {timeout.total_seconds():.0f} s: {arrived} of "
                               f"{info.world_size} ranks arrived (a rank is missing, died at start-up, or "
                               "cannot reach the store)") from None


def release_mpi(info: LaunchInfo) -> None:
    """Finalize MPI once every rank has arrived, when the job was discovered through it.

    MPI's only work here is the rendezvous (one broadcast); the job's communication is the
    process group's. Finalizing while every rank is alive and waiting means that at the
    end each rank leaves on its own, without MPI's collective finalize (which would hold
    every rank until the slowest, e.g. rank 0 writing the model)."""
    if info.comm is None:
        return
    from mpi4py import MPI  # discovery imported it

    if not MPI.Is_finalized():
        MPI.Finalize()


@dataclass
class DistContext:
    """A started job: launch info, the store, this rank's device and the start-up timings."""

    info: LaunchInfo
    backend: object
    device: object
    store: object
    timeout: datetime.timedelta
    timings: Timings

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size


_context: DistContext | None = None


def current() -> DistContext | None:
    return _context


def init(backend=None, rank: int | None = None, world_size: int | None = None, local_rank: int | None = None,
         iface: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Discover, rendezvous and create the default process group (idempotent).

    ``backend`` is a glm backend (name or object); its ``dist_backend`` names the
    torch.distributed backend and ``setup_process`` binds this rank's device.
    """
    global _context
    if _context is not None:
        return _context
    b = backend if isinstance(backend, Backend) else get_backend(backend, needs_graph=True)
    t = Timings()
    t0 = time.perf_counter()
    info = discover(rank, world_size, local_rank)
    t.discover = time.perf_counter() - t0
    timeout = timeout_for(info.world_size, timeout_s)
    t0 = time.perf_counter()
    store = open_store(info, timeout, iface)
    t.store = time.perf_counter() - t0
    t0 = time.perf_counter()
    wait_for_all(store, info, timeout)
    t.arrival = time.perf_counter() - t0
    release_mpi(info)
    device = b.setup_process(info.local_rank)
    t0 = time.perf_counter()
    kw = {} if device.type == "cpu" else {"device_id": device}  # eager communicator on accelerators
    try:
        dist.init_process_group(b.dist_backend, store=dist.PrefixStore("glm/pg", store), rank=info.rank,
                                world_size=info.world_size, timeout=timeout, **kw)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"rank {info.rank}: creating the {b.dist_backend} process group failed: {e}") \
            from None
    t.process_group = time.perf_counter() - t0
    _context = DistContext(info, b, device, store, timeout, t)
    return _context


def shutdown() -> None:
    """Destroy the process group (call on the normal exit path)."""
    global _context
    if dist.is_initialized():
        dist.destroy_process_group()
    _context = None


def finish(rc: int) -> int:
    """The normal end of a command: in a job of several ranks, destroy the process group,
    flush and leave with the C library's ``exit(rc)``; alone, destroy the process group
    (if any) and return ``rc``.

    A rank skips the interpreter's teardown on purpose. There, C++ objects that own threads
    (gloo's, the store's) are destroyed in no set order, and in 8-rank training a rank
    sometimes aborted after its work was done ("terminate called without an active
    exception", exit status 15 under mpiexec), also with the process group destroyed
    first. Nothing is lost by skipping it: commands write their files atomically before
    they return.

    ``exit`` rather than ``os._exit``: the C library's exit handlers still run, and MPICH
    (5.0) ends its link to the launcher there, not in ``MPI_Finalize``. A rank that left
    with ``os._exit`` was taken for a crash, and the launcher SIGKILLed the ranks still at
    work (mpiexec exit status 9)."""
    ctx = _context
    shutdown()
    if ctx is None or ctx.world_size < 2:
        return rc
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).exit(rc)


SUPERVISED_WAIT_S = 5.0


@contextlib.contextmanager
def fail_fast(what: str = "the distributed job"):
    """Turn a failed start or collective of a running job into one line and exit status 3.

    When a peer dies, its sockets close and the next collective on every other rank raises
    (gloo: "Connection closed by peer"; a hung peer: the collective timeout). Exiting at
    once with ``os._exit`` matters: a normal interpreter exit would run the process group's
    destructor, which may wait on the dead peer. Outside a job of several ranks neither
    error is a peer's doing, and both pass through.

    Under ``glmrt launch`` (``GLM_LAUNCH_HUB`` set) this rank's supervisor learns at once
    which rank failed, prints the line naming it and stops this process; so this line is
    printed only if no stop comes within :data:`SUPERVISED_WAIT_S` (a peer that hangs
    instead of dying), and a survivor never prints two.
    """
    try:
        yield
    except DistributedError as e:
        if not under_launcher():  # a single process: the caller's one-line user error
            raise
        _die(f"{what} failed: {e}")
    except RuntimeError as e:  # torch.distributed errors derive from RuntimeError
        ctx = current()
        if ctx is None or ctx.world_size < 2:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _die(f"rank {ctx.rank} of {ctx.world_size}: {what} failed ({type(e).__name__}: {first}); a peer rank "
             f"died, hung past the {ctx.timeout.total_seconds():.0f} s timeout or is unreachable")


def _die(msg: str) -> None:
    if os.environ.get(HUB_ENV):
        time.sleep(SUPERVISED_WAIT_S)  # the supervisor stops this process meanwhile if a peer died
    # one write of the whole line: ranks sharing a terminal must not interleave mid-line
    sys.stderr.write(f"glmrt: error: {msg}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(3)
