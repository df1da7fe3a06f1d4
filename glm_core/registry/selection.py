"""Discovering backends through entry points and choosing one.

Precedence of the choice: explicit argument (``--backend``) > ``GLM_BACKEND`` >
``backend:`` in a run config file > ``auto``. ``auto`` takes the available backend with
the highest probe score and logs the ranking with every backend's reason.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass

import pluggy

from ..errors import BackendError
from . import hookspecs
from .backend import Backend, Probe

log = logging.getLogger("glm_runtime.core.registry")
ENTRY_POINT_GROUP = "glm_runtime.backends"
ENV_VAR = "GLM_BACKEND"


@dataclass
class Discovered:
    """A backend found at discovery, with its probe result (or why it could not load)."""

    name: str
    backend: Backend | None
    probe: Probe
    source: str

    @property
    def available(self) -> bool:
        return self.probe.available


_cache: dict | None = None
_plugin_manager: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    global _plugin_manager
    if _plugin_manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        _plugin_manager = pm
    return _plugin_manager


def discover(refresh: bool = False) -> dict[str, Discovered]:
    """Load every ``glm_runtime.backends`` entry point and probe each backend it provides.

    A plugin that fails to import, or states another API version, is listed as
    unavailable with the reason instead of breaking discovery for the others.
    """
    global _cache, _plugin_manager
    if _cache is not None and not refresh:
        return _cache
    if refresh:
        _plugin_manager = None
    pm = plugin_manager()
    found: dict[str, Discovered] = {}
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    for ep in eps:
        source = f"{ep.value} (entry point {ep.name!r})"
        try:
            plugin = ep.load()
            if pm.is_registered(plugin):
                continue
            pm.register(plugin, name=ep.name)
        except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
            found[ep.name] = Discovered(ep.name, None,
                                        Probe(False, f"plugin failed to load: {type(e).__name__}: {e}"), source)
            continue
        impl = [h for h in pm.hook.glm_backends.get_hookimpls() if h.plugin is plugin]
        try:
            backends = [b for h in impl for b in (h.function() or [])]
        except Exception as e:  # noqa: BLE001
            found[ep.name] = Discovered(ep.name, None,
                                        Probe(False, f"glm_backends() failed: {type(e).__name__}: {e}"), source)
            continue
        for b in backends:
            found[b.name] = _probe(b, source)
    _cache = found
    return found


def _probe(b: Backend, source: str) -> Discovered:
    if b.api_version != hookspecs.API_VERSION:
        return Discovered(b.name, None, Probe(False, f"plugin implements API version {b.api_version}, "
                                                     f"glm-runtime needs {hookspecs.API_VERSION}"), source)
    try:
        p = b.probe()
    except Exception as e:  # noqa: BLE001 - a probe must never take discovery down
        p = Probe(False, f"probe raised {type(e).__name__}: {e}")
    return Discovered(b.name, b, p, source)


def extra_kernels(backend_name: str) -> dict:
    """Kernels other plugins contribute to ``backend_name`` (hook ``glm_extra_kernels``)."""
    discover()
    out: dict = {}
    for contrib in plugin_manager().hook.glm_extra_kernels(backend_name=backend_name):
        if contrib:
            out.update(contrib)
    return out


def kernels_for(backend: Backend) -> dict:
    """Every kernel of ``backend``: its own, replaced or extended by what other plugins add
    for it (the one place the two are merged; the op table, the op listing, the conformance
    kit and the op benchmarks all use it)."""
    return {**backend.kernels(), **extra_kernels(backend.name)}


def available_backends() -> list[Discovered]:
    return sorted((d for d in discover().values() if d.available), key=lambda d: -d.probe.score)


def _describe_all() -> str:
    parts = []
    for d in sorted(discover().values(), key=lambda d: d.name):
        parts.append(f"{d.name} ({'available' if d.available else 'unavailable: ' + d.probe.reason})")
    return "; ".join(parts) or "none installed"


def resolve_backend_name(explicit: str | None = None, config_value: str | None = None) -> str:
    """Apply the selection precedence; returns a name or ``auto``."""
    for v in (explicit, os.environ.get(ENV_VAR), config_value):
        if v:
            return v
    return "auto"


def get_backend(name: str | None = None, config_value: str | None = None, needs_graph: bool = False) -> Backend:
    """The backend to use, following the precedence; errors say what is installed and why
    each unavailable backend is unavailable.

    ``needs_graph``: the caller needs a backend that runs the GLM graph on its kernels
    (tensor/pipeline parallelism, training, batched serving), so ``auto`` passes over
    backends that run a graph of their own (:attr:`Backend.runs_own_graph`) and naming one
    is an error.
    """
    name = resolve_backend_name(name, config_value).lower()
    found = discover()
    if name == "auto":
        ranking = [d for d in available_backends() if not (needs_graph and d.backend.runs_own_graph)]
        for d in sorted(found.values(), key=lambda d: (-d.available, -d.probe.score)):
            skip = " (runs its own graph: not for this use)" if needs_graph and d.backend is not None and \
                d.backend.runs_own_graph else ""
            log.info("auto: %-6s score %3d  %s%s", d.name, d.probe.score if d.available else -1, d.probe.reason,
                     skip)
        if not ranking:
            raise BackendError(f"no backend available: {_describe_all()}")
        log.info("auto: chose %s", ranking[0].name)
        return ranking[0].backend
    for d in found.values():
        if d.name == name or (d.backend is not None and name in d.backend.aliases):
            if not d.available:
                raise BackendError(f"backend {name!r} is unavailable: {d.probe.reason}")
            if needs_graph and d.backend.runs_own_graph:
                raise BackendError(f"backend {name!r} runs exported graphs of its own; this needs a backend that runs "
                                   f"the GLM graph (tensor/pipeline parallelism, training, batched serving), e.g. cpu")
            return d.backend
    raise BackendError(f"unknown backend {name!r}; installed: {_describe_all()}")
