"""``glmrt launch``: start N ranks of a command under mpirun, srun, torchrun or locally.

The ranks find each other the same way whatever started them (:mod:`glm_runtime.parallel.bootstrap`
discovers rank and world size from MPI, Slurm or torchrun), so this command builds the
launcher's command line and forwards the environment the backend needs
(``Backend.forward_env_prefixes``, its visible-devices variable and every ``GLM_*``
variable). ``mpirun -n 4 glmrt generate ... --tp 2`` works without it too; what this
command adds is the end of a failed job: every rank runs under a supervisor
(:mod:`glm_runtime.cli.supervise`), so when one rank exits non-zero or dies, every other
rank is stopped within a second, each says which rank failed, and the job's exit status
is the failed rank's, under every launcher.

``--launcher local`` starts the ranks itself and opens their rendezvous store on port 0
(torchrun's "agent store" arrangement, so no port is chosen and released first).
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
from glm_runtime.core.schema import arg_type, integer
from glm_runtime.parallel.bootstrap import host_address, timeout_for
from glm_runtime.parallel.launchenv import HUB_ENV

from .common import add_backend_args, select_backend
from .supervise import Hub, describe, say, shell_status

NAME = "launch"
HELP = "start N ranks of a command under mpirun, srun, torchrun or locally"
EXAMPLE = "glmrt launch -n 2 --launcher mpirun -- glmrt generate ckpt/ --tp 2 --prompt 'Hello'"
LAUNCHERS = ("auto", "local", "mpirun", "srun", "torchrun")


def add_arguments(p):
    p.add_argument("-n", "--nproc", type=arg_type(integer(1, 2**20)), required=True, help="number of ranks")
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


def run_local(n: int, command: list[str], timeout_s: float, env: dict) -> list[int]:
    """Start n ranks here (each ``command`` with its rank's variables and an agent-hosted
    rendezvous store); their supervisors' exit statuses."""
    store = TCPStore("127.0.0.1", 0, n, True, timeout=datetime.timedelta(seconds=timeout_s),
                     wait_for_workers=False, use_libuv=True)
    procs = [subprocess.Popen(command, env=dict(env, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                                                   LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                                                   MASTER_PORT=str(store.port), GLM_AGENT_STORE="1"))
             for r in range(n)]
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.05)
    except KeyboardInterrupt:  # the ranks got the terminal's Ctrl-C too; make sure they end
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    return [shell_status(p.returncode) for p in procs]


def _check_command(command: list[str]) -> None:
    """A command that cannot run here is one line now, not an error from every rank later."""
    exe = command[0]
    found = (os.access(exe, os.X_OK) and not os.path.isdir(exe)) if os.sep in exe else shutil.which(exe)
    if not found:
        raise GLMError(f"command {exe!r} not found{' or not executable' if os.sep in exe else ' on PATH'}")


def run(args) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise GLMError("no command to launch (put it after --)")
    _check_command(command)
    backend = select_backend(args)
    launcher = _pick(args.launcher)
    extra = args.launcher_args.split() if args.launcher_args else []
    hub = None if args.dry_run else Hub(host_address(all_local=launcher in ("local", "torchrun")), args.nproc)
    env = dict(os.environ, **{HUB_ENV: hub.address if hub else "HOST:PORT:TOKEN"},
               **({"GLM_BACKEND": args.backend} if args.backend else {}))
    env_names = forwarded_env(backend, env)
    supervised = [sys.executable, "-m", "glm_runtime.cli.supervise", *command]
    cmd = build_command(launcher, args.nproc, supervised, env_names, extra)
    if args.dry_run:
        print(f"# launcher: {launcher}; forwarded: {', '.join(env_names) or 'nothing'}")
        print(" ".join(cmd))
        return 0
    try:
        if launcher == "local":
            statuses = run_local(args.nproc, cmd, timeout_for(args.nproc).total_seconds() + 60, env)
        else:
            try:
                statuses = [subprocess.call(cmd, env=env)]
            except FileNotFoundError:
                raise GLMError(f"launcher {cmd[0]!r} not found") from None
    finally:
        hub.close()
    if hub.failed is not None:
        rank, status = hub.failed
        say(f"rank {rank} {describe(status)}: the job ends with its status")
        return status
    return next((s for s in statuses if s != 0), 0)
