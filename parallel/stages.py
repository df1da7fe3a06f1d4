"""Which layers each pipeline stage holds.

Apart from :mod:`.pipeline` because inference needs the partition too, and that module
imports torch.distributed.pipelining (and with it torch's compiler stack, seconds of
start-up per process) for the training schedules.
"""
from __future__ import annotations

from glm_runtime.core.errors import GLMError


def partition_layers(num_layers: int, stages: int, ends_lighter: bool = False) -> list[tuple[int, int]]:
    """[start, end) layer ranges of each stage, as even as possible (extra layers go to the
    earliest stages). ``ends_lighter``: the first and last stage take one layer fewer
    than the others, to balance the embedding and the output projection they also hold
    (GLM-130B: 70 layers on 8 stages as 8, 9, 9, 9, 9, 9, 9, 8)."""
    if stages < 1:
        raise GLMError(f"pipeline stages must be >= 1, got {stages}")
    if stages == 1:
        return [(0, num_layers)]
    slots = num_layers + (2 if ends_lighter else 0)
    base, extra = divmod(slots, stages)
    counts = [base + (1 if i < extra else 0) for i in range(stages)]
    if ends_lighter:
        counts[0] -= 1
        counts[-1] -= 1
    if min(counts[1:-1] or [1]) < 1 or min(counts) < 0:
        raise GLMError(f"cannot split {num_layers} layers into {stages} pipeline stages"
                       f"{' with lighter ends' if ends_lighter else ''}")
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds
