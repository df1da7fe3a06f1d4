"""What the distribution installs: one import root, complete, that nothing in the user's
working directory can shadow; and a pytest plugin that costs nothing when unused."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"glm_runtime": "glm_runtime", "glm_core": "glm_runtime/core", "backends": "glm_runtime/backends",
           "parallel": "glm_runtime/parallel", "converters": "glm_runtime/converters"}
BIN = Path(sys.executable).parent


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_DEVICE_BACKEND_AUTOLOAD")}
    env.update(extra)
    return env


@pytest.mark.slow
def test_wheel_installs_one_import_root_holding_every_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("glm_runtime-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"glm_runtime"}
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["glm_runtime"]
    # every source module is packaged under its mapped name (pyproject's package list is complete)
    want = {f"{FOLDERS[folder]}/{p.relative_to(ROOT / folder).as_posix()}"
            for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    assert want - set(names) == set()
    assert "glm_runtime/core/assets/glm-tiny/model.safetensors" in names


@pytest.fixture()
def shadowing_dir(tmp_path):
    """A working directory with its own packages of the generic names, which break on import."""
    for name in ("backends", "parallel", "converters", "glm_core"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package')\n")
        (tmp_path / name / "cpu").mkdir()
        (tmp_path / name / "cpu" / "__init__.py").write_text("")
    return tmp_path


def test_installed_cli_finds_the_cpu_backend_from_a_shadowing_directory(shadowing_dir):
    r = subprocess.run([str(BIN / "glmrt"), "backends"], cwd=shadowing_dir, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "cpu: available" in r.stdout


def test_python_api_loads_a_model_from_a_shadowing_directory(shadowing_dir):
    code = textwrap.dedent("""
        from glm_runtime import load_model
        from glm_runtime.core.assets import default_model_dir
        m = load_model(default_model_dir())  # backend: auto
        print(m.backend.name, m.generate([[5, 6, 7]], max_new_tokens=2, stop_token_ids=[]).shape[1])
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=shadowing_dir, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["onnx", "5"]  # auto: the onnx backend is installed here, and ranks first


def test_pytest_plugin_costs_nothing_without_glm_backend(tmp_path):
    """pytest loads the conformance kit's plugin in every session of an environment where
    glm-runtime is installed: without --glm-backend it imports no torch and leaves the
    environment alone."""
    (tmp_path / "test_other_project.py").write_text(textwrap.dedent("""
        import os, sys

        def test_collected_without_torch(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("glm_runtime")
            assert "torch" not in sys.modules
            assert "TORCH_DEVICE_BACKEND_AUTOLOAD" not in os.environ
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "1 passed" in r.stdout
