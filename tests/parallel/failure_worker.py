"""A job in which one rank dies: the others must exit with an error naming the failure.

Every rank all-reduces in a loop; rank ``--victim`` kills itself with SIGKILL (no
clean-up, like a node crash) after ``--after`` rounds. The survivors run inside
``glm_runtime.parallel.bootstrap.fail_fast`` and must print one error line and exit with status 3.
"""
import argparse
import os
import signal
import time

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from glm_runtime.parallel import bootstrap  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--victim", type=int, default=1)
ap.add_argument("--after", type=int, default=3)
args = ap.parse_args()
ctx = bootstrap.init("cpu")
with bootstrap.fail_fast("all-reduce loop"):
    x = torch.ones(1000)
    for i in range(10_000):
        if ctx.rank == args.victim and i == args.after:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.all_reduce(x)
        x.fill_(1.0)
        time.sleep(0.01)
print(f"rank {ctx.rank}: loop finished without noticing the dead rank", flush=True)
