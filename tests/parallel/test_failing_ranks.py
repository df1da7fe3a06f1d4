"""A failing rank ends the job under every launcher ``glmrt launch`` drives: the other ranks are
stopped at once (not after the rendezvous or collective timeout, which is set far beyond
these tests' own time limits), each says in one line which rank failed, and the job's exit
status is the failed rank's (128 + N for a rank killed by signal N)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

# rank 1 fails at once; rank 0 would wait ten minutes
EXIT3 = 'r=${RANK:-$PMI_RANK}; if [ "$r" = 1 ]; then echo "rank 1: giving up" >&2; exit 3; fi; sleep 600'
DIES_AT_START = textwrap.dedent("""
    import os, signal
    from glm_runtime.parallel import bootstrap
    if os.environ.get("RANK", os.environ.get("PMI_RANK")) == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    bootstrap.init("cpu")
    print("rank", bootstrap.current().rank, "started", flush=True)
""")
DIES_WHILE_DECODING = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed as dist
    from glm_runtime.cli.main import main
    if os.environ["RANK"] == "1":  # a node lost mid-generation: no clean-up, no message
        real, calls = dist.all_reduce, [0]
        def dying(*a, **k):
            calls[0] += 1
            if calls[0] == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        dist.all_reduce = dying
    sys.exit(main(sys.argv[1:]))
""")


def launch(launcher: str, *command, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               GLM_DIST_TIMEOUT="900")  # only the launcher can end these jobs within the test's time
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([str(BIN / "glmrt"), "launch", "-n", "2", "--launcher", launcher, "--", *map(str, command)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def ours(stderr: str) -> list[str]:
    """The lines glm-runtime wrote (torchrun adds banners of its own at start-up)."""
    return [x for x in stderr.splitlines() if x.startswith(("glmrt", "rank 1:"))]


@pytest.mark.parametrize("launcher", ["local", "mpirun", "torchrun"])
def test_a_rank_that_exits_non_zero_ends_the_job_with_its_status(launcher):
    p = launch(launcher, "sh", "-c", EXIT3)
    assert p.returncode == 3, p.stderr
    assert ours(p.stderr) == ["rank 1: giving up", "glmrt launch: rank 0: stopping: rank 1 exited with status 3",
                              "glmrt launch: rank 1 exited with status 3: the job ends with its status"], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("launcher", ["local", "mpirun"])
def test_a_rank_killed_during_start_up_ends_the_rendezvous(launcher):
    p = launch(launcher, sys.executable, "-c", DIES_AT_START)
    assert p.returncode == 128 + 9, p.stderr
    assert "glmrt launch: rank 0: stopping: rank 1 was killed by SIGKILL" in ours(p.stderr), p.stderr
    assert "started" not in p.stdout and "Traceback" not in p.stderr


def test_a_rank_killed_while_decoding_leaves_one_line_per_survivor(tmp_path):
    from glm_runtime.converters import native
    from glm_runtime.core.build import random_state
    from glm_runtime.core.presets import preset

    cfg = preset("tiny-chatglm2", vocab_size=1003, num_layers=3)
    ckpt = native.save(tmp_path / "ckpt", cfg, random_state(cfg, seed=5))
    worker = tmp_path / "worker.py"
    worker.write_text(DIES_WHILE_DECODING)
    p = launch("local", sys.executable, worker, "generate", ckpt, "--ids", "5,6,7", "--max-new-tokens", "16",
               "--backend", "cpu", "--tp", "2")
    assert p.returncode == 128 + 9, p.stderr
    assert ours(p.stderr) == ["glmrt launch: rank 0: stopping: rank 1 was killed by SIGKILL",
                              "glmrt launch: rank 1 was killed by SIGKILL: the job ends with its status"], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_every_launcher_runs_the_ranks_under_the_supervisor(capsys):
    from glm_runtime.cli.main import main

    for launcher in ("local", "mpirun", "srun", "torchrun"):
        assert main(["launch", "-n", "2", "--launcher", launcher, "--dry-run", "--", "true"]) == 0
        out = capsys.readouterr().out
        assert "GLM_LAUNCH_HUB" in out.splitlines()[0]
        assert out.splitlines()[1].endswith("-m glm_runtime.cli.supervise true"), out
