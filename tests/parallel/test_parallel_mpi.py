"""Multi-process checks: the (TP, PP, DP) grid under mpiexec, torchrun and the local
launcher against the single-process model, and failure handling (a rank killed mid-job,
a rank that never arrives). One launch per world size runs every check of that size
(see mpi_worker.py for what is compared and the fp32 tolerances)."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _env(**extra):
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _results(out: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]


def _run(cmd, timeout=240, **env):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=_env(**env),
                       cwd=ROOT)
    return p, _results(p.stdout)


def _check(p, results, expected: int):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len(results) == expected, p.stdout[-3000:]
    for r in results:
        assert all(r.get(k, True) for k in ("logits", "tokens", "loss", "grads", "cache")), r


def test_grid_2_ranks_via_glmrt_launch_mpirun(mpiexec, tmp_path):
    """(2,1,1) and (1,2,1) with both schedules, three families; load_model(tp=2) API."""
    p, res = _run([BIN / "glmrt", "launch", "-n", "2", "--launcher", "mpirun", "--", sys.executable,
                   HERE / "mpi_worker.py", "--layouts", "2,1,1;1,2,1;1,2,1:gpipe",
                   "--configs", "chatglm2,glm-130b,chatglm-6b", "--load-model", "2,1", "--workdir", tmp_path])
    _check(p, res, 3 * 3 + 1)
    assert {(r["tp"], r["pp"]) for r in res} == {(2, 1), (1, 2)}


def test_grid_4_ranks(mpiexec, tmp_path):
    """(4,1,1): 2 KV groups on 4 TP ranks (replicated); (2,2,1); (2,1,2) with DDP and with
    FSDP2; load_model(tp=2, pp=2)."""
    p, res = _run([mpiexec, "-n", "4", sys.executable, HERE / "mpi_worker.py",
                   "--layouts", "4,1,1;2,2,1;2,1,2;2,1,2:fsdp", "--load-model", "2,2", "--workdir", tmp_path])
    _check(p, res, 4 * 2 + 1)
    assert {r.get("data_parallel") for r in res if r.get("dp") == 2} == {"ddp", "fsdp2"}


def test_grid_8_ranks(mpiexec):
    """(2,2,2): TP x PP x DP together (DDP inside the pipeline schedule)."""
    p, res = _run([mpiexec, "-n", "8", sys.executable, HERE / "mpi_worker.py", "--layouts", "2,2,2:gpipe"])
    _check(p, res, 2)


def test_a_rank_that_ends_first_leaves_its_peers_at_work(mpiexec, tmp_path):
    """Under mpiexec, rank 1 ends through bootstrap.finish while rank 0 still works (as
    rank 0 writes the model after training): rank 0 finishes its work and the job exits 0.
    A rank leaving with os._exit made MPICH's launcher SIGKILL rank 0 every time."""
    done = tmp_path / "rank0-done"
    code = ("import sys, time; from pathlib import Path; from glm_runtime.parallel import bootstrap\n"
            "ctx = bootstrap.init('cpu')\n"
            "if ctx.rank == 0:\n"
            "    time.sleep(2); Path(sys.argv[1]).write_text('done')\n"
            "sys.exit(bootstrap.finish(0))\n")
    p, _ = _run([mpiexec, "-n", "2", sys.executable, "-c", code, done], timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert done.read_text() == "done"


def test_torchrun_launch_discovers_ranks():
    """The same worker started by torchrun (env:// variables, no MPI)."""
    p, res = _run([BIN / "glmrt", "launch", "-n", "2", "--launcher", "torchrun", "--", sys.executable,
                   HERE / "mpi_worker.py", "--layouts", "2,1,1", "--configs", "chatglm-6b"])
    _check(p, res, 1)


def test_killed_rank_makes_the_others_fail_fast():
    """SIGKILL one of 3 ranks mid-loop: the launcher stops the two others at once (the
    collective timeout is far beyond the test's own limit), each says which rank died, and
    the job's status is the dead rank's."""
    p = subprocess.run([str(BIN / "glmrt"), "launch", "-n", "3", "--launcher", "local", "--", sys.executable,
                        str(HERE / "failure_worker.py"), "--victim", "1"], capture_output=True, text=True,
                       timeout=120, env=_env(GLM_DIST_TIMEOUT="900"), cwd=ROOT)
    assert p.returncode == 128 + 9, p.stderr
    for r in (0, 2):
        assert p.stderr.count(f"glmrt launch: rank {r}: stopping: rank 1 was killed by SIGKILL") == 1, p.stderr
    assert "glmrt: error" not in p.stderr and "Traceback" not in p.stderr  # no second line from a survivor
    assert "loop finished" not in p.stdout


def test_unsupervised_survivors_fail_fast_on_their_own():
    """Without glmrt launch (torchrun's variables, a store of our own) a survivor notices the
    dead peer in its next collective and exits 3 with one line, well within the timeout."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    procs = [subprocess.Popen([sys.executable, str(HERE / "failure_worker.py"), "--victim", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(store.port), GLM_AGENT_STORE="1", GLM_DIST_TIMEOUT="900"),
                              cwd=ROOT) for r in range(2)]
    out, err = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=120)
    assert procs[0].returncode == 3 and procs[1].returncode == -9
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmrt: error: rank 0 of 2: all-reduce loop failed"), err


def test_missing_rank_is_reported_by_count_not_a_hang():
    """World size 3 with only 2 ranks started: both stop after the timeout saying 2 of 3 arrived."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, 3, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    code = "from glm_runtime.parallel import bootstrap; bootstrap.init('cpu')"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(store.port), GLM_AGENT_STORE="1", GLM_DIST_TIMEOUT="4"),
                              cwd=ROOT) for r in range(2)]
    t0 = time.monotonic()
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert time.monotonic() - t0 < 40
    for p, err in zip(procs, errs):
        assert p.returncode != 0
        assert "2 of 3 ranks arrived" in err, err


def test_glmrt_generate_tp2_under_mpiexec_matches_single_process(mpiexec, tmp_path):
    from glm_runtime.converters import native
    from glm_runtime.core.build import random_state
    from glm_runtime.core.presets import preset

    cfg = preset("tiny-chatglm2", vocab_size=1003, num_layers=3)
    ckpt = native.save(tmp_path / "ckpt", cfg, random_state(cfg, seed=5))
    args = [ckpt, "--ids", "5,6,7,8,9", "--max-new-tokens", "6", "--backend", "cpu"]
    single = subprocess.run([str(BIN / "glmrt"), "generate", *map(str, args)], capture_output=True, text=True,
                            env=_env(), timeout=120)
    par = subprocess.run([str(mpiexec), "-n", "2", str(BIN / "glmrt"), "generate", *map(str, args), "--tp", "2"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert single.returncode == 0 and par.returncode == 0, single.stderr + par.stderr
    assert par.stdout.strip() == single.stdout.strip()  # printed once (rank 0), same tokens
    assert len(single.stdout.strip().split(",")) == 11
