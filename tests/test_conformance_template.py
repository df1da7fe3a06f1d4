"""The template plugin package: pip-installed, discovered, selected, and passing the kit.

It is installed with pip from a copy of examples/glm-backend-template into a directory of
its own (``--target``), which is then put on the path of the child processes: the same
entry-point discovery as an install into site-packages, without changing the shared test
environment for other tests. ``--no-deps --no-build-isolation`` keeps it offline and fast.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from test_conformance_kit import ROOT, kit

TEMPLATE = ROOT / "examples" / "glm-backend-template"


@pytest.fixture(scope="module")
def template_site(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "glm-backend-template"
    shutil.copytree(TEMPLATE, src)
    site = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert any(p.name.startswith("glm_backend_template-") and p.suffix == ".dist-info" for p in site.iterdir())
    return site


def _env(site):
    return dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))


def test_template_is_discovered_listed_and_selected(template_site):
    env = _env(template_site)
    r = subprocess.run([sys.executable, "-m", "glm_runtime.cli.main", "backends"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "template: available - template kernels on the host CPU" in r.stdout
    assert "from glm_backend_template.plugin (entry point 'template')" in r.stdout
    r = subprocess.run([sys.executable, "-m", "glm_runtime.cli.main", "doctor", "--backend", "template"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "[ok] template smoke" in r.stdout, r.stdout + r.stderr
    code = ("from glm_runtime.core.registry import get_backend; from glm_runtime.core.build import build_model; "
            "from glm_runtime.core.presets import preset; b = get_backend('template'); "
            "m = build_model(preset('tiny-chatglm2'), None, b, strict_ops=True); "
            "print(type(b).__module__, m.ops.format_report())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("glm_backend_template.plugin")
    assert "reference" not in r.stdout.split("\n", 1)[1].replace("op table", "")  # every op is the template's


@pytest.mark.slow
def test_template_passes_the_conformance_kit(template_site):
    r = kit("--glm-backend", "template", "--glm-strict", "-k",
            "test_op or test_declares or (test_model and (glm-130b-8 or chatglm2-4)) or test_two_process",
            env={"PYTHONPATH": str(template_site)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "failed" not in r.stdout and "36 passed" in r.stdout  # 32 op cases, identity, 2 models, 2-process TP
