"""Data parallelism: DistributedDataParallel over the DP group of the topology.

DDP averages gradients over the data-parallel replicas during backward (bucketed
all-reduce); it composes with TP (each TP shard is reduced with its peers holding the
same shard: the DP group) and with PP (torch's pipelining runs the all-reduce once, after
the last micro-batch). FSDP2 (``fully_shard``) is available through
:func:`wrap_fsdp` where the backend supports it; docs/parallel.md records what was
verified on gloo.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


def wrap_ddp(module: nn.Module, topo) -> nn.Module:
    """DDP over ``topo.dp_group`` (identity when dp == 1)."""
    if topo.dp == 1:
        return module
    return DistributedDataParallel(module, process_group=topo.dp_group)


def wrap_fsdp(module: nn.Module, topo) -> nn.Module:
    """FSDP2 over the DP dimension of the topology's mesh (parameters sharded over DP)."""
    if topo.dp == 1:
        return module
    for p in module.parameters():  # FSDP2 shards flat storage: backend layouts are given up
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    return fully_shard(module, mesh=topo.mesh["dp"])
