"""Backend plugins: hook specifications, the Backend base class, discovery and selection."""
from .backend import Backend, Capabilities, Check, Probe
from .hookspecs import API_VERSION, hookimpl, hookspec
from .selection import available_backends, discover, get_backend, kernels_for, resolve_backend_name

__all__ = ["API_VERSION", "Backend", "Capabilities", "Check", "Probe", "hookimpl", "hookspec",
           "available_backends", "discover", "get_backend", "kernels_for", "resolve_backend_name"]
