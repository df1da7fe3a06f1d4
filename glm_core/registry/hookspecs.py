"""Hook specifications of the ``glm_runtime.backends`` plugin API (pluggy).

A plugin is a module (or object) listed under the ``glm_runtime.backends`` entry-point group
of its package's metadata, e.g. in pyproject.toml::

    [project.entry-points."glm_runtime.backends"]
    mychip = "glm_mychip.plugin"

and it implements some of the hooks below with ``@glm_runtime.core.registry.hookimpl``. The
in-tree backends (``backends/cpu`` ...) are registered in exactly this way.

The plugin API version (:data:`API_VERSION`) is checked at discovery: a backend whose
``api_version`` differs is reported as unavailable with the reason, never loaded half-way.
"""
from __future__ import annotations

import pluggy

PROJECT = "glm_runtime"
API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def glm_backends() -> list:
    """Return the :class:`~glm_runtime.core.registry.backend.Backend` objects this plugin provides.

    Called once at discovery. Must be cheap and must not initialise any device runtime:
    availability is decided later by ``Backend.probe()``. A plugin may provide several
    backends (e.g. one package serving two device types).
    """


@hookspec
def glm_extra_kernels(backend_name: str) -> dict | None:
    """Return extra op kernels ``{op_name: Kernel}`` for the backend called ``backend_name``.

    Lets a package add or replace kernels of a backend it does not own (a tuned attention
    for the cpu backend, say) without patching it. Later-registered plugins win on
    conflicts; the op report names the op's provider either way.
    """
