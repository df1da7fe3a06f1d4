"""Acceptance under mpiexec (gloo, CPU): training with (TP, PP, DP) = (2, 2, 2) follows the
single-process run, and a TP=2 x PP=2 run killed with SIGKILL and resumed repeats the
uninterrupted run bit for bit.

Tolerance of the layout comparison: 1e-6 relative on every step's loss, total and
embedding gradient norms over 20 steps. TP splits each matmul's and the vocab-parallel
softmax's fp32 sums, DP sums two halves of the batch, so results differ from one process
in the last bits (measured: at most 2.4e-7 relative over 20 steps); 1e-6 is 8 fp32 ulps,
and a real error (a gradient missing a contribution, a wrong token weighting) is orders
of magnitude larger (a pipeline schedule that rescaled accumulated gradients showed as a
2.4e-2 gradient-norm difference).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, env, tiny_config, tiny_corpus, tiny_tokenizer, write_config

from glm_runtime.training.monitor import read_log

pytestmark = pytest.mark.slow
GLMRT = Path(sys.executable).parent / "glmrt"
KEYS = ("loss", "grad_norm", "embed_grad_norm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mpiexec):
    d = tmp_path_factory.mktemp("par")
    corpus = tiny_corpus(d)
    tok = tiny_tokenizer(d, corpus)
    cfg = write_config(d / "train.yaml", tiny_config(d, corpus, tok, steps=20, save_interval=5, eval_interval=10))
    return d, cfg, mpiexec


def _train(cfg, run, n=1, extra=(), timeout=400, popen=False, mpiexec=None):
    cmd = [str(GLMRT), "train", str(cfg), "--run-dir", str(run), "--no-progress", *extra]
    if n > 1:
        cmd = [str(mpiexec), "-n", str(n), *cmd]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return read_log(run / "train.jsonl")


def test_2_2_2_follows_single_process(setup):
    d, cfg, mpiexec = setup
    single = _train(cfg, d / "single")
    par = _train(cfg, d / "p222", n=8, extra=("--tp", "2", "--pp", "2"), mpiexec=mpiexec)
    assert [r["step"] for r in par] == list(range(1, 21))
    assert par[0]["batch_size"] < par[-1]["batch_size"]  # batch-size warm-up changes the micro-batch count
    for a, b in zip(single, par):
        for k in KEYS:
            assert abs(a[k] - b[k]) <= 1e-6 * abs(a[k]), (a["step"], k, a[k], b[k])
    assert abs(single[-1]["eval_loss"] - par[-1]["eval_loss"]) <= 1e-6 * single[-1]["eval_loss"]


def test_resume_under_mpiexec_tp2_pp2_is_bit_identical(setup):
    d, cfg, mpiexec = setup
    tp_pp = ("--tp", "2", "--pp", "2", "--steps", "12")
    straight = _train(cfg, d / "straight", n=4, extra=tp_pp, mpiexec=mpiexec)
    run = d / "killed"
    p = _train(cfg, run, n=4, extra=tp_pp, popen=True, mpiexec=mpiexec)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and p.poll() is None:
        recs = read_log(run / "train.jsonl")
        if recs and recs[-1]["step"] >= 7:
            os.killpg(p.pid, signal.SIGKILL)  # mpiexec, its proxies and all four ranks
            killed = True
            break
        time.sleep(0.01)
    p.communicate(timeout=60)
    assert killed, "the run ended before it could be killed"
    assert read_log(run / "train.jsonl")[-1]["step"] < 12
    latest = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert latest >= 5
    resumed = _train(cfg, run, n=4, extra=tp_pp, mpiexec=mpiexec)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in KEYS + ("lr", "batch_size", "tokens")} == \
            {k: b[k] for k in KEYS + ("lr", "batch_size", "tokens")}, a["step"]
    from glm_runtime.converters.tensor_io import read_safetensors

    a = read_safetensors(d / "straight" / "model" / "model.safetensors")
    b = read_safetensors(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_layout_reshards_weights_and_adam_state(setup):
    """A one-process checkpoint resumed under TP=2 x PP=2 (weights and AdamW moments cut by
    glm_runtime.core.sharding.shard) continues the one-process curve within the layout tolerance;
    the TP x PP checkpoint read back by one process gives the gathered weights exactly."""
    import shutil

    d, cfg, mpiexec = setup
    flags = ("--steps", "12", "--save-interval", "6")
    single = _train(cfg, d / "rs", extra=flags)
    run = d / "rp"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(d / "rs" / "checkpoints" / "step-00000006", run / "checkpoints" / "step-00000006")
    (run / "checkpoints" / "latest").write_text("step-00000006\n")
    shutil.copyfile(d / "rs" / "train.jsonl", run / "train.jsonl")
    par = _train(cfg, run, n=4, extra=(*flags, "--tp", "2", "--pp", "2"), mpiexec=mpiexec)
    assert [r["step"] for r in par] == list(range(1, 13))
    for a, b in zip(single[6:], par[6:]):
        for k in KEYS:
            assert abs(a[k] - b[k]) <= 1e-6 * abs(a[k]), (a["step"], k, a[k], b[k])
    # back to one process: all 12 steps are done, so it only reshards and exports
    back = d / "rback"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step-00000012", back / "checkpoints" / "step-00000012")
    (back / "checkpoints" / "latest").write_text("step-00000012\n")
    _train(cfg, back, extra=flags)
    from glm_runtime.converters.tensor_io import read_safetensors

    a = read_safetensors(run / "model" / "model.safetensors")
    b = read_safetensors(back / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
