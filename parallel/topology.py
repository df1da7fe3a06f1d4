"""TP x DP x PP process groups from a DeviceMesh, created once, eagerly, and timed.

Rank layout as Megatron's: ``rank = pp_index * (dp * tp) + dp_index * tp + tp_index``.
Tensor parallelism is innermost, so a TP group is a run of consecutive ranks (which
launchers place on one node); then data parallelism; pipeline stages are outermost.

Every rank takes part in creating every group, in the same order (what torch requires of
``new_group``); the cost of doing so grows with the number of groups and is reported
(``Topology.creation_s``) because group creation is slow on some collective libraries and
at scale.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from glm_runtime.core.errors import GLMError

from . import bootstrap

log = logging.getLogger("glm_runtime.parallel")


@dataclass(frozen=True)
class Coords:
    pp: int
    dp: int
    tp: int


def rank_of(pp: int, dp: int, tp: int, sizes: tuple[int, int, int]) -> int:
    _, d, t = sizes
    return pp * d * t + dp * t + tp


def coords_of(rank: int, sizes: tuple[int, int, int]) -> Coords:
    _, d, t = sizes
    return Coords(rank // (d * t), (rank // t) % d, rank % t)


def _group_count() -> int:
    return dist.distributed_c10d._world.group_count


class Topology:
    """Process groups of one job. ``sizes`` is (pp, dp, tp); dp defaults to what is left."""

    def __init__(self, tp: int = 1, pp: int = 1, dp: int | None = None, device_type: str = "cpu"):
        world = dist.get_world_size()
        if dp is None:
            if world % (tp * pp):
                raise GLMError(f"world size {world} is not a multiple of tp x pp = {tp} x {pp}")
            dp = world // (tp * pp)
        if tp * pp * dp != world:
            raise GLMError(f"tp x pp x dp = {tp} x {pp} x {dp} = {tp * pp * dp}, but the job has {world} ranks")
        self.tp, self.pp, self.dp = tp, pp, dp
        self.sizes = (pp, dp, tp)
        self.rank = dist.get_rank()
        self.world_size = world
        self.coords = coords_of(self.rank, self.sizes)
        t0 = time.perf_counter()
        count0 = _group_count()
        self.mesh = init_device_mesh(device_type, self.sizes, mesh_dim_names=("pp", "dp", "tp"))
        self.tp_group = self.mesh.get_group("tp")
        self.dp_group = self.mesh.get_group("dp")
        self.pp_group = self.mesh.get_group("pp")
        self.embedding_group = self._embedding_groups() if pp > 1 else None
        self.creation_s = time.perf_counter() - t0
        self.groups_created = _group_count() - count0  # new_group calls every rank made

    def _embedding_groups(self):
        """First and last stage of every pipeline: they share a tied embedding's gradient."""
        mine = None
        for d in range(self.dp):
            for t in range(self.tp):
                ranks = [rank_of(0, d, t, self.sizes), rank_of(self.pp - 1, d, t, self.sizes)]
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    mine = g
        return mine

    # ------------------------------------------------------------------ roles
    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.pp - 1

    def stage_rank(self, stage: int) -> int:
        """Global rank of pipeline stage ``stage`` in this rank's pipeline."""
        return rank_of(stage, self.coords.dp, self.coords.tp, self.sizes)

    def __repr__(self) -> str:
        c = self.coords
        return f"<Topology tp={self.tp} pp={self.pp} dp={self.dp}; rank {self.rank} at pp={c.pp} dp={c.dp} tp={c.tp}>"


_topologies: dict[tuple, Topology] = {}


def get_topology(tp: int = 1, pp: int = 1, dp: int | None = None, backend=None) -> Topology:
    """The job's topology for these sizes (bootstraps first; groups are created once)."""
    ctx = bootstrap.init(backend)
    key = (tp, pp, dp)
    if key not in _topologies:
        t = Topology(tp, pp, dp, device_type=ctx.backend.device_type)
        ctx.timings.subgroups = t.creation_s
        _topologies[key] = t
        if t.rank == 0:
            phases = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in ctx.timings.as_dict().items())
            log.info("%d ranks (%s via %s), tp=%d pp=%d dp=%d, %d process groups: %s", t.world_size,
                     ctx.backend.dist_backend, ctx.info.source, t.tp, t.pp, t.dp, t.groups_created, phases)
    return _topologies[key]
