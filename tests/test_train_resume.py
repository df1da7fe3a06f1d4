"""Acceptance: a training run killed with SIGKILL and resumed from its last checkpoint gives
a loss curve bit-identical to an uninterrupted run (CPU, fp32, one process, fixed threads).

Bit-identical, not "close": every quantity a step depends on is restored exactly (fp32
weights, AdamW moments and step, collator offset and RNG state, loss scale, torch RNG),
and the CPU kernels are deterministic for a fixed thread count, so any difference at all
is a resumption bug.
"""
from __future__ import annotations

import signal
import time

import pytest
import torch
from train_helpers import glmrt, tiny_config, tiny_corpus, tiny_tokenizer, write_config

from glm_runtime.training.monitor import read_log

CURVE = ("loss", "grad_norm", "embed_grad_norm", "lr", "loss_scale", "batch_size", "tokens", "skipped")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    corpus = tiny_corpus(d)
    return d, corpus, tiny_tokenizer(d, corpus)


def _run_to_end(cfg_path, run_dir):
    p = glmrt("train", str(cfg_path), "--run-dir", str(run_dir), "--no-progress")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return err


def test_killed_and_resumed_run_matches_uninterrupted(setup):
    d, corpus, tok = setup
    cfg = write_config(d / "train.yaml", tiny_config(d, corpus, tok, steps=60, save_interval=10))

    _run_to_end(cfg, d / "straight")
    straight = read_log(d / "straight" / "train.jsonl")
    assert [r["step"] for r in straight] == list(range(1, 61))

    # Kill once the log shows step 15 (checkpoint 10 exists, 20 not yet): SIGKILL, no cleanup.
    run = d / "killed"
    p = glmrt("train", str(cfg), "--run-dir", str(run), "--no-progress")
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        recs = read_log(run / "train.jsonl")
        if recs and recs[-1]["step"] >= 15:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = read_log(run / "train.jsonl")[-1]["step"]
    assert killed_at < 60
    latest = (run / "checkpoints" / "latest").read_text().strip()
    resumed_from = int(latest.split("-")[1])
    assert 10 <= resumed_from < 60

    err = _run_to_end(cfg, run)
    assert f"trained steps {resumed_from + 1}..60" in err
    resumed = read_log(run / "train.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 61))
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in CURVE} == {k: b[k] for k in CURVE}, f"step {a['step']} differs"
        assert a.get("eval_loss") == b.get("eval_loss")
    # and the final weights, bit for bit (not the files' bytes: safetensors writes its
    # metadata map in a random order)
    from glm_runtime.converters.tensor_io import read_safetensors

    a = read_safetensors(d / "straight" / "model" / "model.safetensors")
    b = read_safetensors(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
