"""Where a process sits in a launched job, read from what its launcher set (no torch).

The discovery order of rank, world size and local rank is documented in
:mod:`glm_runtime.parallel.bootstrap`, which uses this module; it lives apart because
``glmrt launch``'s per-rank supervisor (``glm_runtime.cli.supervise``) needs the rank
too, and must start in milliseconds, without importing torch.

``HUB_ENV`` is how a rank learns that such a supervisor watches it: the launcher sets it
to the address of the hub that stops every rank when one fails.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from glm_runtime.core.errors import GLMError

HUB_ENV = "GLM_LAUNCH_HUB"

MPI_MARKERS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID")


class DistributedError(GLMError):
    """The job could not start, or a peer rank failed while it ran."""


@dataclass
class LaunchInfo:
    """Where this process sits in the job, and how that was found out."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str  # "explicit", "torchrun", "mpi4py", "openmpi", "pmi", "pmix", "slurm", "single"
    comm: object = None  # mpi4py COMM_WORLD when discovered through MPI

    @property
    def all_local(self) -> bool:
        return self.local_world_size == self.world_size


def env_int(env: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise DistributedError(f"environment variable {n}={v!r} is not an integer") from None
    return None


def _from_env(env: Mapping[str, str]) -> LaunchInfo | None:
    """Steps 4-6 of the discovery order (launcher variables, no MPI library)."""
    table = (
        ("openmpi", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",),
         ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
        ("pmi", ("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID"),
         ("MPI_LOCALNRANKS", "PALS_LOCAL_SIZE")),
        ("pmix", ("PMIX_RANK",), ("PMIX_SIZE", "OMPI_COMM_WORLD_SIZE"), ("PMIX_LOCAL_RANK",),
         ("PMIX_LOCAL_SIZE",)),
        # SLURM_STEP_NUM_TASKS is set by srun for its step only: a batch script inside an
        # allocation (SLURM_NTASKS set, no step) is not a launched rank.
        ("slurm", ("SLURM_PROCID",), ("SLURM_STEP_NUM_TASKS",), ("SLURM_LOCALID",), ("SLURM_NTASKS_PER_NODE",)),
    )
    for source, rk, ws, lr, lw in table:
        rank, world = env_int(env, *rk), env_int(env, *ws)
        if rank is None or world is None:
            continue
        local = env_int(env, *lr)
        try:  # local sizes only decide whether the loopback can host the store
            lsize = env_int(env, *lw)
        except DistributedError:
            lsize = None
        if local is None:
            local, lsize = 0, 1
        return LaunchInfo(rank, world, local, lsize or world, source)
    return None


def _from_mpi() -> LaunchInfo | None:
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    world = MPI.COMM_WORLD
    shared = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    info = LaunchInfo(world.Get_rank(), world.Get_size(), shared.Get_rank(), shared.Get_size(), "mpi4py", world)
    shared.Free()
    return info


def discover(rank: int | None = None, world_size: int | None = None, local_rank: int | None = None,
             env: Mapping[str, str] | None = None, use_mpi: bool = True) -> LaunchInfo:
    """Rank, world size and local rank in the documented order (module docstring)."""
    env = os.environ if env is None else env
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise DistributedError("give both rank and world_size, or neither")
        lr = local_rank if local_rank is not None else (env_int(env, "LOCAL_RANK") or 0)
        return LaunchInfo(rank, world_size, lr, env_int(env, "LOCAL_WORLD_SIZE") or world_size, "explicit")
    r, w = env_int(env, "RANK"), env_int(env, "WORLD_SIZE")
    if r is not None and w is not None:
        lr = env_int(env, "LOCAL_RANK")
        return LaunchInfo(r, w, lr or 0, env_int(env, "LOCAL_WORLD_SIZE") or (w if lr is None else 1), "torchrun")
    if use_mpi and any(m in env for m in MPI_MARKERS):
        info = _from_mpi()
        launcher = _from_env(env)
        # An MPI library that does not match the launcher starts as a singleton; then the
        # launcher's own variables are the truth.
        if info is not None and not (info.world_size == 1 and launcher and launcher.world_size > 1):
            return info
    info = _from_env(env)
    if info is not None:
        return info
    return LaunchInfo(0, 1, 0, 1, "single")


def under_launcher(env: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by a launcher for a job of more than one rank."""
    return discover(env=env, use_mpi=False).world_size > 1
