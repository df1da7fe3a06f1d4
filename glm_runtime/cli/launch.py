"""``glmrt launch``: start N ranks of a command under mpirun, srun, torchrun or locally.

The ranks find each other the same way whatever started them (:mod:`glm_runtime.parallel.bootstrap`
discovers rank and world size from MPI, Slurm or torchrun), so this command only builds
the launcher's command line and forwards the environment the backend needs
(``Backend.forward_env_prefixes``, its visible-devices variable and every ``GLM_*``
variable). ``mpirun -n 4 glmrt generate ... --tp 2`` works just as well without it.

``--launcher local`` starts the ranks itself: it opens the rendezvous store on port 0
(torchrun's "agent store" arrangement, so no port is chosen and released first), passes
its address to the children, and when a rank dies it gives the others the collective
timeout to notice and exit with their own error before it stops them.
"""
from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import time

from torch.distributed import TCPStore

from glm_runtime.core.errors import GLMError
from glm_runtime.parallel.bootstrap import timeout_for

from .common import add_backend_args, select_backend

NAME = "launch"
HELP = "start N ranks of a command under mpirun, srun, torchrun or locally"
EXAMPLE = "glmrt launch -n 2 --launcher mpirun -- glmrt generate ckpt/ --tp 2 --prompt 'Hello'"
LAUNCHERS = ("auto", "local", "mpirun", "srun", "torchrun")


def add_arguments(p):
    p.add_argument("-n", "--nproc", type=int, required=True, help="number of ranks")
    p.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                   help="auto: srun inside a Slurm allocation, else mpirun when found, else local")
    p.add_argument("--launcher-args", default="", help="extra arguments for the launcher (quoted string)")
    p.add_argument("--dry-run", action="store_true", help="print the launcher command line and exit")
    add_backend_args(p)
    p.add_argument("command", nargs="+", help="the command every rank runs (put it after --)")


def forwarded_env(backend, env=None) -> list[str]:
    """Names of the variables a launcher must pass to every rank."""
    env = os.environ if env is None else env
    prefixes = ("GLM_", "TORCH_DEVICE_BACKEND_AUTOLOAD") + tuple(backend.forward_env_prefixes)
    names = sorted(k for k in env if k.startswith(prefixes))
    if backend.visible_devices_env and backend.visible_devices_env in env:
        names.append(backend.visible_devices_env)
    return names


def _mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    for c in (here, shutil.which("mpiexec"), shutil.which("mpirun")):
        if c and os.path.exists(c):
            return c
    raise GLMError("no mpiexec/mpirun found (pip install glm-runtime[mpi] installs MPICH's)")


def _mpi_flavour(mpiexec: str) -> str:
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "hydra"
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out else "hydra"


def build_command(launcher: str, n: int, command: list[str], env_names: list[str], extra: list[str],
                  mpiexec: str | None = None, flavour: str | None = None) -> list[str]:
    """The launcher's command line (``local`` returns the command itself)."""
    if launcher == "mpirun":
        mpiexec = mpiexec or _mpiexec()
        flavour = flavour or _mpi_flavour(mpiexec)
        fwd: list[str] = []
        if env_names and flavour == "openmpi":
            for k in env_names:
                fwd += ["-x", k]
        elif env_names:
            fwd = ["-genvlist", ",".join(env_names)]
        return [mpiexec, "-n", str(n), *fwd, *extra, *command]
    if launcher == "srun":
        return ["srun", "-n", str(n), "--export=ALL", *extra, *command]
    if launcher == "torchrun":
        script = command[0].endswith(".py")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                *extra, *([] if script else ["--no-python"]), *command]
    return list(command)


def _pick(launcher: str) -> str:
    if launcher != "auto":
        return launcher
    if os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
        return "srun"
    try:
        _mpiexec()
        return "mpirun"
    except GLMError:
        return "local"


def run_local(n: int, command: list[str], grace_s: float) -> int:
    """Start n ranks here with an agent-hosted store; see the module docstring."""

    store = TCPStore("127.0.0.1", 0, n, True, timeout=datetime.timedelta(seconds=grace_s + 60),
                     wait_for_workers=False, use_libuv=True)
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), GLM_AGENT_STORE="1")
        procs.append(subprocess.Popen(command, env=env))
    status, failed_at = [None] * n, None
    while any(s is None for s in status):
        for r, p in enumerate(procs):
            if status[r] is None and p.poll() is not None:
                status[r] = p.returncode
                if p.returncode != 0:
                    wait = f"; waiting up to {grace_s:.0f} s for the others" if failed_at is None else ""
                    failed_at = failed_at or time.monotonic()
                    print(f"glmrt launch: rank {r} exited with status {p.returncode}{wait}", file=sys.stderr,
                          flush=True)
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for r, p in enumerate(procs):
                if status[r] is None:
                    print(f"glmrt launch: rank {r} still running {grace_s:.0f} s after a failure: stopping it",
                          file=sys.stderr, flush=True)
                    p.send_signal(signal.SIGTERM)
            for r, p in enumerate(procs):
                if status[r] is None:
                    try:
                        status[r] = p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        status[r] = p.wait()
        time.sleep(0.05)
    bad = [(r, s) for r, s in enumerate(status) if s != 0]
    return bad[0][1] if bad else 0


def run(args) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise GLMError("no command to launch (put it after --)")
    if args.nproc < 1:
        raise GLMError(f"--nproc must be >= 1, got {args.nproc}")
    backend = select_backend(args)
    launcher = _pick(args.launcher)
    extra = args.launcher_args.split() if args.launcher_args else []
    env_names = forwarded_env(backend)
    if args.backend:
        os.environ["GLM_BACKEND"] = args.backend
        env_names = sorted(set(env_names) | {"GLM_BACKEND"})
    cmd = build_command(launcher, args.nproc, command, env_names, extra)
    if args.dry_run:
        print(f"# launcher: {launcher}; forwarded: {', '.join(env_names) or 'nothing'}")
        print(" ".join(cmd))
        return 0
    if launcher == "local":
        return run_local(args.nproc, cmd, timeout_for(args.nproc).total_seconds())
    try:
        return subprocess.call(cmd)
    except FileNotFoundError:
        raise GLMError(f"launcher {cmd[0]!r} not found") from None
