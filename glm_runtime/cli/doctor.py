"""``glmrt doctor``: per backend, the versions it depends on, smoke checks, and an op benchmark.

What is printed comes from the backends themselves (``Backend.probe()`` and
``Backend.doctor()``): this command knows no vendor. Two checks are generic:

* torch's device-backend auto-load. Packages registered under torch's ``torch.backends``
  entry-point group are imported by ``import torch`` itself; one that fails to import (a
  device extension installed without its vendor toolkit) makes every torch program fail.
  glmrt runs with ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``; doctor tries a plain ``import torch``
  in a child process with the auto-load on and says whether it would work.
* ``--bench``: on an available backend's device, each tuned op is timed on GLM-sized
  inputs and reported as achieved GB/s (memory-bound ops) and TFLOP/s (matmul-like ops),
  with the fraction of the device's peak where the backend states it (or where
  ``GLM_PEAK_GBPS`` / ``GLM_PEAK_TFLOPS`` give it), so a user with the hardware can
  verify the kernels and report numbers.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from glm_runtime.cli.bench_ops import run_benchmarks
from glm_runtime.core.registry.selection import discover
from glm_runtime.core.schema import arg_type, integer

from .common import add_backend_args, select_backend

NAME = "doctor"
HELP = "check backends: versions, smoke tests, and (--bench) op throughput against the device's peak"
EXAMPLE = "glmrt doctor --backend NAME --bench"


def add_arguments(p):
    add_backend_args(p)
    p.add_argument("--bench", action="store_true", help="time each op on the selected backend's device")
    p.add_argument("--bench-tokens", type=arg_type(integer(1, 2**20)), default=2048, help="tokens per benchmark batch (default 2048)")
    p.add_argument("--bench-size", choices=("6b", "tiny"), default="6b",
                   help="6b: a 6B-class layer (default); tiny: a quick smoke run of the same code")
    p.add_argument("--bench-iters", type=arg_type(integer(1, 10**6)), default=10, help="timed calls per op (median reported)")
    p.add_argument("--bench-dtype", default=None, help="float16, bfloat16 or float32 (default: the backend's "
                                                      "first compute dtype)")


def _autoload_check() -> tuple[bool, str]:
    eps = [f"{e.name} ({e.value})" for e in importlib.metadata.entry_points(group="torch.backends")]
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="1")
    r = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=300)
    registered = f"auto-loaded packages: {', '.join(eps) if eps else 'none'}"
    if r.returncode == 0:
        return True, f"plain `import torch` works; {registered}"
    last = (r.stderr.strip().splitlines() or ["?"])[-1]
    return False, (f"plain `import torch` FAILS with auto-load on ({last}); {registered}. Fix the toolkit of that "
                   f"package or keep TORCH_DEVICE_BACKEND_AUTOLOAD=0 (glmrt sets it)")


def _line(ok, name, detail):
    print(f"  [{'ok' if ok else '--'}] {name}: {detail}")


def run(args) -> int:

    print(f"python {platform.python_version()} on {platform.platform()}; torch {torch.__version__}")
    ok, detail = _autoload_check()
    _line(ok, "torch device-backend auto-load", detail)
    found = discover()
    wanted = None
    if args.backend:
        wanted = select_backend(args).name if args.bench else args.backend.lower()
    for name, d in sorted(found.items()):
        if wanted and not (name == wanted or (d.backend and wanted in d.backend.aliases)):
            continue
        print(f"{name}: {'available' if d.available else 'unavailable'} - {d.probe.reason}")
        if d.backend is None:
            continue
        b = d.backend
        print(f"  device type {b.device_type}, distributed backend {b.dist_backend}, visible-devices variable "
              f"{b.visible_devices_env or '-'}")
        try:
            checks = b.doctor()
        except Exception as e:  # noqa: BLE001 - a broken check is itself the finding
            checks = []
            _line(False, "doctor", f"raised {type(e).__name__}: {e}")
        for c in checks:
            _line(c.ok, c.name, c.detail)
    if args.bench:
        b = select_backend(args)
        dtype = getattr(torch, args.bench_dtype) if args.bench_dtype else b.capabilities().compute_dtypes[0]
        for line in run_benchmarks(b, dtype, args.bench_tokens, args.bench_iters, args.bench_size):
            print(line)
    return 0
