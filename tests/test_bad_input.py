"""Bad input: one line naming the file or value and the problem, exit code != 0, no
traceback (unless --debug), and nothing half-written on disk."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

ENV = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")


def glmrt(*args):
    p = subprocess.run([sys.executable, "-m", "glm_runtime.cli.main", *map(str, args)], capture_output=True,
                       text=True, env=ENV, timeout=120)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, *needles):
    assert rc != 0
    lines = [x for x in err.strip().splitlines() if not x.startswith("WARNING")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def native_dir(hf_dirs, tmp_path):
    d = tmp_path / "native"
    from glm_runtime.cli.main import main

    assert main(["convert", str(hf_dirs["glm"]), str(d)]) == 0
    return d


def test_missing_model_dir(tmp_path):
    rc, _, err = glmrt("generate", tmp_path / "nope", "--ids", "1,2")
    assert_one_line_error(rc, err, str(tmp_path / "nope"), "no such file")


def test_truncated_safetensors(native_dir, tmp_path):
    f = native_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, _, err = glmrt("generate", native_dir, "--ids", "1,2")
    assert_one_line_error(rc, err, str(f), "truncated or corrupt")


def test_config_shapes_do_not_match_weights(native_dir):
    cfg = json.loads((native_dir / "config.json").read_text())
    cfg["ffn_hidden_size"] += 8
    (native_dir / "config.json").write_text(json.dumps(cfg))
    rc, _, err = glmrt("generate", native_dir, "--ids", "1,2")
    assert_one_line_error(rc, err, str(native_dir), "mlp.fc1.weight", "shape")


def test_unknown_backend_lists_installed(native_dir):
    rc, _, err = glmrt("generate", native_dir, "--ids", "1,2", "--backend", "tpu9000")
    assert_one_line_error(rc, err, "unknown backend 'tpu9000'", "cpu (available")


def test_unknown_backend_from_env(native_dir):
    p = subprocess.run([sys.executable, "-m", "glm_runtime.cli.main", "generate", str(native_dir), "--ids", "1"],
                       capture_output=True, text=True, env=dict(ENV, GLM_BACKEND="nosuch"), timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "unknown backend 'nosuch'")


def test_id_outside_vocabulary(native_dir):
    rc, _, err = glmrt("generate", native_dir, "--ids", "1,99999")
    assert_one_line_error(rc, err, "token id 99999", "outside the vocabulary", "320")


def test_debug_shows_traceback(native_dir):
    rc, _, err = glmrt("--debug", "generate", native_dir, "--ids", "99999")
    assert rc != 0 and "Traceback" in err


def test_convert_failure_writes_nothing(native_dir, tmp_path):
    (native_dir / "model.safetensors").write_bytes(b"\x00" * 16)
    out = tmp_path / "out"
    rc, _, err = glmrt("convert", native_dir, out)
    assert_one_line_error(rc, err, "model.safetensors")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_interrupted_write_leaves_no_output(hf_dirs, tmp_path, monkeypatch):
    """A crash in the middle of writing (simulated) leaves neither the output nor a temp dir."""
    from glm_runtime.converters import native
    from glm_runtime.converters.detect import load_checkpoint

    _, cfg, state, _ = load_checkpoint(hf_dirs["glm"])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(OSError):
        native.save(tmp_path / "out", cfg, state)
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, _, err = glmrt("convert", tmp_path, tmp_path / "out")
    assert_one_line_error(rc, err, str(tmp_path), "not a recognised GLM checkpoint")


def test_run_config_backend(native_dir, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("backend: nonesuch\n")
    rc, _, err = glmrt("generate", native_dir, "--ids", "1", "--config", run)
    assert_one_line_error(rc, err, "unknown backend 'nonesuch'")
    rc, out, err = glmrt("generate", native_dir, "--ids", "1", "--config", run, "--backend", "cpu",
                         "--max-new-tokens", "2")
    assert rc == 0, err


@pytest.mark.parametrize("cmd", ["generate", "convert", "backends"])
def test_help_has_example(cmd):
    rc, out, _ = glmrt(cmd, "--help")
    assert rc == 0 and "example:" in out and "glmrt " + cmd in out


def test_written_files_follow_the_umask(hf_dirs, tmp_path):
    """safetensors creates its files 0600; a converted model must be readable as the umask says."""
    from glm_runtime.converters import native
    from glm_runtime.converters.detect import load_checkpoint

    _, cfg, state, _ = load_checkpoint(hf_dirs["glm"])
    old = os.umask(0o022)
    try:
        out = native.save(tmp_path / "out", cfg, state)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes == {name: 0o644 for name in modes} and "model.safetensors" in modes, modes
