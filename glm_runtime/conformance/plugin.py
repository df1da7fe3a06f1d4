"""pytest plugin of the conformance kit (registered under the ``pytest11`` entry point).

Adds ``--glm-backend NAME`` (or ``--glm-backend-object module:Class``), ``--glm-host``,
``--glm-dtypes`` and ``--glm-strict``. With one of the first two and no test paths on the
command line, the session collects the kit's suite (``glm_runtime/conformance/suite``)
instead of the project's tests. Without them the plugin does nothing, so it is harmless
in every other pytest run: it imports neither torch nor the kit (``target`` is imported
by the fixture that needs it, the one project import done inside a function for a reason
other than an optional dependency), and leaves the environment alone.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from glm_runtime import disable_torch_device_autoload

SUITE = Path(__file__).with_name("suite")


def pytest_addoption(parser):
    g = parser.getgroup("glm-conformance", "glm-runtime backend conformance kit")
    g.addoption("--glm-backend", help="check the installed backend NAME")
    g.addoption("--glm-backend-object", help="check a backend given as module:attribute (class or factory)")
    g.addoption("--glm-host", action="store_true",
                help="run the backend's kernels on host (CPU) tensors: Triton kernels under TRITON_INTERPRET=1, "
                     "or a vendor module replaced by a fake")
    g.addoption("--glm-dtypes", help="comma-separated dtypes to check (default: every dtype its kernels declare)")
    g.addoption("--glm-strict", action="store_true",
                help="an op without a kernel (reference fallback) fails instead of being skipped")


def _active(config) -> bool:
    return bool(config.getoption("--glm-backend") or config.getoption("--glm-backend-object"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not _active(config):
        return
    disable_torch_device_autoload()  # before the kit imports torch
    config.addinivalue_line("markers", "glm_conformance: a check of the backend conformance kit")
    source = getattr(config, "args_source", None)
    explicit = source is not None and source == pytest.Config.ArgsSource.ARGS
    if not explicit:
        config.args[:] = [str(SUITE)]


@pytest.fixture(scope="session")
def glm_target(request):
    from .target import resolve  # here, not at the top: the inactive plugin must not import torch

    c = request.config
    if not _active(c):
        pytest.skip("no --glm-backend given")
    return resolve(c.getoption("--glm-backend"), c.getoption("--glm-backend-object"), c.getoption("--glm-host"),
                   c.getoption("--glm-dtypes"))


@pytest.fixture(scope="session")
def glm_strict(request):
    return bool(request.config.getoption("--glm-strict"))


def pytest_report_header(config):
    if _active(config):
        return (f"glm conformance kit: backend {config.getoption('--glm-backend') or config.getoption('--glm-backend-object')}"
                f"{' on host tensors' if config.getoption('--glm-host') else ''}")
