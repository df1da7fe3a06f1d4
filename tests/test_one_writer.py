"""One writer per destination: outputs that race, replace, overlap their source or are left
behind by a dead writer, and the training run directory's lock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glm_runtime.cli.main import main as glmrt
from glm_runtime.converters import native
from glm_runtime.converters.native import atomic_dir
from glm_runtime.core.errors import GLMError
from glm_runtime.core.files import exclusive_lock

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", PYTHONPATH=str(ROOT))


def write(dst: Path, text: str, overwrite: bool = False) -> None:
    with atomic_dir(dst, overwrite) as tmp:
        (tmp / "who").write_text(text)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_destination_that_appears_meanwhile_is_never_replaced(tmp_path):
    """Writer A starts, writer B starts and finishes first: A's rename must not replace B's
    output (it used to, silently); A fails with one line and leaves no temporary."""
    dst = tmp_path / "out"
    with pytest.raises(GLMError, match="appeared while this run was writing it") as e:
        with atomic_dir(dst) as a:
            (a / "who").write_text("A")
            write(dst, "B")
    assert "\n" not in str(e.value) and str(dst) in str(e.value)
    assert (dst / "who").read_text() == "B"
    assert leftovers(tmp_path) == []


def test_force_replaces_atomically_and_leaves_nothing(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    write(dst, "old")
    with atomic_dir(dst, overwrite=True) as a:
        (a / "who").write_text("new")
        write(dst, "racer", overwrite=True)  # another --force writer finishing first
    assert (dst / "who").read_text() == "new" and sorted(os.listdir(dst)) == ["who"]
    assert leftovers(tmp_path) == []
    # where the file system cannot swap two names atomically, the old output is moved aside
    monkeypatch.setattr(native, "_exchange", lambda a, b: False)
    write(dst, "newer", overwrite=True)
    assert (dst / "who").read_text() == "newer" and leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path):
    write(tmp_path / "out", "first")
    with pytest.raises(GLMError, match="already exists"):
        write(tmp_path / "out", "second")
    assert (tmp_path / "out" / "who").read_text() == "first"


DEAD_WRITER = textwrap.dedent("""
    import os, signal, sys
    from glm_runtime.converters.native import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
        (tmp / "half").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_dead_writers_temporary_is_removed_by_the_next_and_a_live_ones_is_not(tmp_path):
    dead = subprocess.run([sys.executable, "-c", DEAD_WRITER, str(tmp_path / "out")], env=ENV, timeout=120)
    assert dead.returncode == -signal.SIGKILL
    stale = leftovers(tmp_path)
    assert len(stale) == 2 and stale[1] == stale[0] + ".lock"  # the temporary and its lock
    with atomic_dir(tmp_path / "other") as live:  # a writer at work in the same directory ...
        (live / "x").write_text("y")
        write(tmp_path / "out", "next")  # ... while the next one runs
        assert leftovers(tmp_path) == sorted([live.name, live.name + ".lock"])  # the dead one's are gone
    assert (tmp_path / "out" / "who").read_text() == "next"
    assert leftovers(tmp_path) == []


def test_the_output_may_not_contain_or_lie_inside_the_source(tmp_path):
    src = tmp_path / "par" / "child"
    src.mkdir(parents=True)
    (tmp_path / "par" / "unrelated").write_text("keep me")
    with pytest.raises(GLMError, match="would replace the source"):
        native.refuse_overlap(tmp_path / "par", [src])
    with pytest.raises(GLMError, match="lies inside the source"):
        native.refuse_overlap(src / "out", [src])
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "par")
    with pytest.raises(GLMError, match="would replace the source"):
        native.refuse_overlap(link, [src])  # the same directory under another name
    native.refuse_overlap(tmp_path / "par2", [src])
    assert (tmp_path / "par" / "unrelated").read_text() == "keep me"


HOLDER = textwrap.dedent("""
    import sys, time
    from glm_runtime.core.files import exclusive_lock
    with exclusive_lock(sys.argv[1], "run directory"):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_a_second_trainer_on_a_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / ".lock")], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert glmrt(["train", "--run-dir", str(run), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"run directory {run} is in use by pid {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(run / ".lock", "run directory"):  # a dead holder's lock is free at once
        pass


@pytest.mark.slow
def test_two_converts_into_one_new_destination(hf_dirs, tmp_path):
    """Started together: exactly one wins, the other says so in one line, the output is whole."""
    dst = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "glm_runtime.cli.main", "convert", str(hf_dirs["glm"]), str(dst)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip()
    assert len(err.splitlines()) == 1 and str(dst) in err and ("already exists" in err or "appeared" in err), err
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    assert native.load(dst)[0].vocab_size == 320
    assert leftovers(tmp_path) == []
