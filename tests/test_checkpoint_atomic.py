"""Acceptance: a checkpoint save killed half-way leaves the previous checkpoint loadable.

A child process trains a tiny model, saves checkpoint 2, trains on and starts saving
checkpoint 4; it is SIGKILLed from inside the save at a chosen point (half of the model
file written, the training state written, just before the directory rename, just before
``latest`` is replaced). The parent then checks that ``latest`` still names a complete
checkpoint and that a new trainer resumes from it.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from train_helpers import ROOT, env, tiny_config, tiny_corpus, tiny_tokenizer

from glm_runtime.core.errors import CheckpointError
from glm_runtime.core.registry import get_backend
from glm_runtime.training import checkpoint
from glm_runtime.training.run import prepare

CHILD = textwrap.dedent("""
    import os, signal, sys, yaml
    import safetensors.torch
    from glm_runtime.core.registry import get_backend
    from glm_runtime.training import checkpoint
    from glm_runtime.training.run import prepare

    point = sys.argv[2]
    cfg = yaml.safe_load(open(sys.argv[1]))
    tr, _ = prepare(cfg, get_backend("cpu"), progress=False)
    tr.train_step(); tr.train_step(); tr.save()
    tr.train_step(); tr.train_step()

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "model-half":
        real = safetensors.torch.save_file
        def half(tensors, path, **kw):
            real(tensors, path, **kw)
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            die()
        checkpoint.save_file = half
    elif point == "after-state":
        real_save = checkpoint.torch.save
        def after(obj, path):
            real_save(obj, path)
            die()
        checkpoint.torch.save = after
    elif point == "before-rename":
        checkpoint.os.rename = lambda *a: die()
    elif point == "before-latest":
        real_write = checkpoint._write_file
        def w(path, write):
            if path.name == checkpoint.LATEST:
                die()
            real_write(path, write)
        checkpoint._write_file = w
    tr.save()
    print("save finished: the kill point was never reached")
""")


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("atomic")
    corpus = tiny_corpus(d)
    tok = tiny_tokenizer(d, corpus)
    (d / "child.py").write_text(CHILD)
    return d, tiny_config(d, corpus, tok, steps=10, save_interval=100)


@pytest.mark.parametrize("point", ["model-half", "after-state", "before-rename", "before-latest"])
def test_killed_save_leaves_previous_checkpoint_loadable(cfg_file, tmp_path, point):
    import yaml

    d, cfg = cfg_file
    cfg = dict(cfg, run_dir=str(tmp_path / "run"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, str(d / "child.py"), str(tmp_path / "cfg.yaml"), point], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".step-00000004.tmp").exists() or (root / "step-00000004").exists()
    latest = checkpoint.latest(root)
    assert latest.name == "step-00000002"
    meta, model_state, train_state = checkpoint.load(latest, 0, 1, {"tp": 1, "pp": 1, "dp": 1})
    assert meta["step"] == 2 and train_state["step"] == 2

    tr, _ = prepare(cfg, get_backend("cpu"), progress=False)
    assert tr.resume() == 2
    assert all(torch.equal(model_state[n], p) for n, p in tr.master.state_dict().items())
    rec = tr.train_step()  # and it trains on from there
    assert rec["step"] == 3 and not rec["skipped"]
    tr.save()  # the stale temp directory of the killed save is replaced
    assert checkpoint.latest(root).name == "step-00000003"


def test_resume_refuses_other_layout_and_corrupt_state(cfg_file, tmp_path):
    d, cfg = cfg_file
    cfg = dict(cfg, run_dir=str(tmp_path / "run"))
    tr, _ = prepare(cfg, get_backend("cpu"), progress=False)
    tr.train_step()
    ck = tr.save()
    with pytest.raises(CheckpointError, match="reads one rank's files of the same layout"):
        checkpoint.load(ck, 0, 4, {"tp": 2, "pp": 2, "dp": 1})
    (ck / "state-rank00000.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="unreadable training state"):
        checkpoint.load(ck, 0, 1, {"tp": 1, "pp": 1, "dp": 1})
