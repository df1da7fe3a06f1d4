"""Parallelism core: bootstrap, topology, tensor / pipeline / data parallelism.

Identical on every backend: collectives are torch.distributed's, and the distributed
backend name comes from the selected glm backend (``Backend.dist_backend``). See
docs/parallel.md for the design and docs/scaling.md for measured start-up figures.
"""
from .bootstrap import DistributedError, discover, fail_fast, init, shutdown, timeout_for
from .pipeline import PipelineTrainer, bubble_theory, partition_layers
from .topology import Topology

__all__ = ["DistributedError", "PipelineTrainer", "Topology", "bubble_theory", "discover", "fail_fast", "init",
           "partition_layers", "shutdown", "timeout_for"]
