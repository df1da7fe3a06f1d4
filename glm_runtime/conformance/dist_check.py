"""Launch the kit's distributed check: two processes of :mod:`glm_runtime.conformance.dist_worker`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(backend: str | None, backend_object: str | None, host: bool, dtypes: str | None = None,
        world: int = 2, timeout: float = 300) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "glm_runtime.conformance.dist_worker"]
    if backend:
        cmd += ["--backend", backend]
    if backend_object:
        cmd += ["--backend-object", backend_object]
    if host:
        cmd.append("--host")
    if dtypes:
        cmd += ["--dtypes", dtypes]
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), TORCH_DEVICE_BACKEND_AUTOLOAD="0",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    lines, ok = [], True
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return False, f"rank {r} did not finish within {timeout:.0f} s"
        rec = None
        for line in out.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
        if p.returncode != 0 or rec is None or not rec["ok"]:
            ok = False
            tail = (err.strip().splitlines() or ["(no stderr)"])[-1]
            lines.append(f"rank {r}: exit {p.returncode}: {rec['detail'] if rec else tail}")
        else:
            lines.append(f"rank {r}: {rec['detail']}")
    return ok, "; ".join(lines)
