"""Pipeline bubble: measured idle fraction of 1F1B and GPipe steps against (p-1)/(m+p-1).

Run with ``mpiexec -n P python benchmarks/pipeline_bubble.py`` (P pipeline stages, one
rank each). For every schedule and micro-batch count it times full training steps and
one micro-batch's forward+backward of each stage alone (:func:`glm_runtime.parallel.pipeline.measure_bubble`)
and prints one JSON line per stage from rank 0; ``--out`` writes them (and a PNG next to it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from glm_runtime.core.build import build_model, random_state  # noqa: E402
from glm_runtime.core.masks import prefill_inputs  # noqa: E402
from glm_runtime.core.presets import preset  # noqa: E402
from glm_runtime.core.registry import get_backend  # noqa: E402
from glm_runtime.parallel import bootstrap  # noqa: E402
from glm_runtime.parallel.model import ParallelModel
from glm_runtime.parallel.pipeline import PipelineTrainer, measure_bubble  # noqa: E402
from glm_runtime.parallel.topology import get_topology  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--microbatches", default="1,2,4,8")
    ap.add_argument("--micro-rows", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers-per-stage", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    backend = get_backend("cpu")
    ctx = bootstrap.init(backend)
    p = ctx.world_size
    cfg = preset("tiny-chatglm2", vocab_size=4096, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32,
                 ffn_hidden_size=768, num_layers=args.layers_per_stage * p)
    topo = get_topology(1, p, 1, backend)
    state = random_state(cfg, seed=0)
    rows = []
    with bootstrap.fail_fast("pipeline bubble benchmark"):
        for schedule in ("1f1b", "gpipe"):
            for m in (int(x) for x in args.microbatches.split(",")):
                if schedule == "1f1b" and m < p:  # 1F1B needs a micro-batch per stage in flight
                    continue
                pm = ParallelModel(build_model(cfg, state, backend), topo, backend=backend)
                pm.requires_grad_(True)
                trainer = PipelineTrainer(pm, microbatches=m, schedule=schedule)
                g = torch.Generator().manual_seed(0)
                ids = torch.randint(0, cfg.vocab_size, (m * args.micro_rows, args.seq), generator=g)
                targets = torch.randint(0, cfg.vocab_size, ids.shape, generator=g)
                pos, mask, _ = prefill_inputs(cfg, ids, None)
                r = measure_bubble(trainer, (ids, targets, pos, mask), args.repeats)
                every = [None] * p
                dist.all_gather_object(every, r)
                if ctx.rank == 0:
                    for x in every:
                        print(json.dumps(x), flush=True)
                    rows.extend(every)
    if ctx.rank == 0 and args.out:
        out = Path(args.out)
        out.write_text(json.dumps({"stages": p, "config": {"hidden": cfg.hidden_size, "layers": cfg.num_layers,
                                                           "seq": args.seq, "micro_rows": args.micro_rows},
                                   "loadavg": os.getloadavg(), "rows": rows}, indent=1) + "\n")
        plot(rows, out.with_suffix(".png"))
    bootstrap.shutdown()


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ms = sorted({r["microbatches"] for r in rows})
    p = rows[0]["stages"]
    ax.plot(ms, [(p - 1) / (m + p - 1) for m in ms], "k--", label="(p-1)/(m+p-1)")
    for schedule, style in (("1f1b", "-o"), ("gpipe", "-s")):
        xs = [m for m in ms if any(r["schedule"] == schedule and r["microbatches"] == m for r in rows)]
        means = [sum(r["bubble"] for r in rows if r["schedule"] == schedule and r["microbatches"] == m) / p
                 for m in xs]
        ax.plot(xs, means, style, label=f"measured {schedule} (mean over stages)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble fraction")
    ax.set_title(f"pipeline bubble, p = {p} stages (gloo, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
