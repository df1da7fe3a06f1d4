"""The op contract, its reference implementations and per-backend op tables."""
from .contract import OPS, TOLERANCES, Kernel, OpSpec, tolerance
from .table import OpPlacement, OpTable

__all__ = ["OPS", "TOLERANCES", "Kernel", "OpSpec", "OpTable", "OpPlacement", "tolerance"]
