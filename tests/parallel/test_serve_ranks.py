"""Serving across ranks: rank 0 answers HTTP, every rank runs the engine's steps on its
shard (tensor or pipeline parallel), and the answers are the one-process model's tokens.

Each server is a real job (``mpiexec`` or ``glmrt launch``) driven by the official
``openai`` client with concurrent requests of different lengths, so the ranks execute
batched decode steps, chunked prefills and finished sequences in lock step. The
checkpoint has no tokenizer: prompts are token ids and each generated token comes back
as its id (the logprobs' token strings).
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [3, 4]]
NEW = 8


def _env():
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GLM-4 (blocked QKV, 2 KV groups: each TP rank holds one) and its one-process
    greedy continuations of :data:`PROMPTS`."""
    from glm_runtime.api import load_model
    from glm_runtime.converters import native
    from glm_runtime.core.build import random_state
    from glm_runtime.core.presets import preset

    cfg = preset("tiny-glm-4", vocab_size=1003, num_layers=4, eos_token_ids=[2], pad_token_id=0)
    ckpt = native.save(tmp_path_factory.mktemp("serve-ranks") / "ckpt", cfg, random_state(cfg, seed=11))
    m = load_model(ckpt, backend="cpu")
    want = [m.generate([p], max_new_tokens=NEW, stop_token_ids=[])[0, len(p):].tolist() for p in PROMPTS]
    return ckpt, want


class Job:
    """A multi-rank ``glmrt serve`` job on a free port."""

    def __init__(self, launch: list[str], ckpt: Path, *serve_args: str):
        self.port = _free_port()
        cmd = [*launch, str(BIN / "glmrt"), "serve", str(ckpt), "--port", str(self.port), "--backend", "cpu",
               "--max-num-seqs", "4", "--name", "m", *serve_args]
        self.proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended before serving: {self.proc.communicate()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("the job did not become healthy")

    def complete_all(self) -> list[list[int]]:
        """Greedy completions of every prompt, sent at once."""
        import openai

        client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

        def one(ids):
            r = client.completions.create(model="m", prompt=ids, max_tokens=NEW, temperature=0, logprobs=0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason == "length"
            return [int(t) for t in r.choices[0].logprobs.tokens]
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(one, PROMPTS))

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate()
            raise AssertionError(f"the job did not stop within {timeout} s: {err[-2000:]}") from None
        return self.proc.returncode, err


def _rank_processes(root: int) -> list[int]:
    """The ranks of a launched job: the processes below ``root`` running ``glmrt serve``
    with no child (the launcher's supervisors run it too, as their command line)."""
    # -ww: whole command lines (ps cuts them at 80 columns when writing to a pipe)
    table = subprocess.run(["ps", "-e", "-ww", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in table.splitlines()]
    children: dict[int, list[int]] = {}
    args = {}
    for pid, ppid, *cmd in rows:
        children.setdefault(int(ppid), []).append(int(pid))
        args[int(pid)] = cmd[0] if cmd else ""
    below, todo = [], [root]
    while todo:
        p = todo.pop()
        below += children.get(p, [])
        todo += children.get(p, [])
    return sorted(p for p in below if "glmrt serve" in args[p] and not children.get(p))


def test_tp2_server_under_mpiexec_answers_like_one_process(mpiexec, checkpoint):
    ckpt, want = checkpoint
    job = Job([str(mpiexec), "-n", "2"], ckpt, "--tp", "2")
    try:
        assert job.complete_all() == want
        assert job.complete_all() == want  # slots freed and reused
    finally:
        job.stop()


def test_pp2_server_under_glmrt_launch_and_a_rank_that_dies(checkpoint):
    """Pipeline stages under the local launcher answer the same; killing the second stage
    ends the whole job (no hang) with one line per rank and no traceback."""
    ckpt, want = checkpoint
    job = Job([str(BIN / "glmrt"), "launch", "-n", "2", "--"], ckpt, "--pp", "2")
    try:
        assert job.complete_all() == want
    except BaseException:
        job.stop()
        raise
    ranks = _rank_processes(job.proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        job.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        job.stop()
        raise AssertionError("the job kept running after a rank died") from None
    code, err = job.stop()
    assert time.monotonic() - t0 < 60
    assert code == 128 + signal.SIGKILL, err
    assert "Traceback" not in err, err[-3000:]
    assert re.search(r"rank [01] was killed by SIGKILL", err), err
