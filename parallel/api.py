"""``load_model(..., tp=, pp=)`` inside a launched job: bootstrap, shard, and the model object.

:func:`glm_core.api.load_model` delegates here when asked for more than one rank's worth
of parallelism or when started by a launcher. Every rank reads the checkpoint, keeps its
shard (the full model is built on the host first: sharded checkpoints are future work)
and gets a :class:`ParallelGLM` whose ``m(ids)`` returns the full logits and whose
``m.generate(...)`` returns the same tokens on every rank.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from glm_core.api import GLM, build_model
from glm_core.errors import GLMError
from glm_core.registry import Backend, get_backend

from . import bootstrap
from .model import ParallelModel
from .topology import Topology, rank_of

log = logging.getLogger("parallel")
_topologies: dict[tuple, Topology] = {}


def topology(tp: int = 1, pp: int = 1, dp: int | None = None, backend=None) -> Topology:
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


def parallelize(model, topo: Topology, ends_lighter: bool = False, backend: Backend | None = None) -> ParallelModel:
    """This rank's TP/PP part of a built :class:`GLMModel` (the model's blocks are reused;
    ``backend`` lays the shards out as its kernels want)."""
    return ParallelModel(model, topo, ends_lighter, backend)


class ParallelGLM(GLM):
    """A :class:`GLM` whose model is one rank's part; calls are collective (every rank of
    the job must make the same call with the same inputs)."""

    def __init__(self, pmodel: ParallelModel, backend: Backend, tokenizer_path=None, source=None):
        super().__init__(pmodel, backend, tokenizer_path, source)
        self.config = pmodel.global_config
        self.topo = pmodel.topo

    def generate(self, input_ids, attention_mask=None, **kw):
        t = self.topo
        if kw.get("do_sample") and kw.get("seed") is None:  # every rank must draw the same samples
            seed = torch.randint(0, 2**62, (1,)) if t.rank == 0 else torch.zeros(1, dtype=torch.long)
            dist.broadcast(seed, src=0)
            kw["seed"] = int(seed)
        out = super().generate(input_ids, attention_mask, **kw)
        if t.dp > 1:  # replicas computed the same thing; make that a guarantee
            src = rank_of(t.pp_rank, 0, t.tp_rank, t.sizes)
            length = torch.tensor([out.shape[1]])
            dist.broadcast(length, src=src, group=t.dp_group)
            if int(length) != out.shape[1]:
                out = out.new_zeros(out.shape[0], int(length))
            dist.broadcast(out, src=src, group=t.dp_group)
        return out


def load_parallel(path, backend=None, tp: int = 1, pp: int = 1, dp: int | None = None, strict_ops=None,
                  progress: bool = False, ends_lighter: bool = False) -> ParallelGLM:
    from converters.detect import load_checkpoint

    b = backend if isinstance(backend, Backend) else get_backend(backend)
    if getattr(b, "load_runtime", None) is not None:
        raise GLMError(f"backend {b.name!r} runs an exported graph; tensor and pipeline parallelism need a "
                       "backend that runs the GLM graph")
    for name, v in (("tp", tp), ("pp", pp), ("dp", dp)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise GLMError(f"{name} must be a positive integer, got {v!r}")
    topo = topology(tp, pp, dp, b)
    ctx = bootstrap.current()
    _, config, state, tok = load_checkpoint(path, progress=progress and topo.rank == 0)
    model = build_model(config, state, b, strict_ops, local_rank=ctx.info.local_rank)
    pm = ParallelModel(model, topo, ends_lighter, b).eval()
    return ParallelGLM(pm, b, None if tok is None else str(tok), source=os.fspath(path))
