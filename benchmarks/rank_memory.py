"""Peak resident memory of each rank of a tensor/pipeline-parallel job against one process.

Every rank builds its part of the model on the meta device and reads only its parts of a
native checkpoint's tensors (safetensors slices); a checkpoint in another format is read
whole and then cut. This measures what that buys, on the 98M-parameter checkpoint
``benchmarks/decode.py`` builds (its ``layers`` model, fp32: 392 MB of weights), in its
transformers form and converted to the native format:

* one process loading the model (``load_model``), the reference;
* ``glmrt launch -n 2`` with ``--tp 2`` and with ``--pp 2``, native and transformers.

Each process reports its peak resident set after loading and one forward pass, and the
same figure before loading (the interpreter, torch, glm-runtime and what building a model
on the meta device imports), so the table separates what the model costs from what every
Python process costs.

    python benchmarks/rank_memory.py [--workdir DIR] [--out docs/rank-memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
BIN = Path(sys.executable).parent


def peak_mb() -> float:
    """This process's peak resident set in MB (``VmHWM``: unlike ``ru_maxrss`` it starts
    afresh at exec, so a child does not inherit the peak of the process that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("this benchmark reads /proc/self/status (Linux)")


def worker(path: str, tp: int, pp: int, out: str) -> None:
    """One process (or one rank): load, run one forward pass, write its figures to
    ``out/rank<N>.json`` (ranks share one stdout, where lines can interleave)."""
    import torch

    from glm_runtime import load_model
    from glm_runtime.core.model import parameter_shapes
    from glm_runtime.core.presets import preset

    parameter_shapes(preset("tiny-glm-4"))  # what building any model on the meta device imports
    before = peak_mb()
    m = load_model(path, backend="cpu", tp=tp, pp=pp)
    m(torch.tensor([[5, 6, 7, 8]]))
    rank = getattr(getattr(m, "topo", None), "rank", 0)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "before_mb": before, "peak_mb": peak_mb()}))


def run(cmd: list[str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        p = subprocess.run([*cmd, out], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}")
        return [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="where decode.py's checkpoints are kept between runs (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "rank-memory.json"))
    ap.add_argument("--worker", nargs=4, metavar=("PATH", "TP", "PP", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), a.worker[3])
        return 0
    from decode import MODELS, make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.workdir or tmp) / "layers"
        hf, nat = base / "hf", base / "native"
        make_checkpoint(hf, MODELS["layers"])
        if not (nat / "config.json").is_file():
            subprocess.run([str(BIN / "glmrt"), "convert", str(hf), str(nat)], check=True, capture_output=True)
        weights_mb = (nat / "model.safetensors").stat().st_size / 2**20
        me = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        launch = [str(BIN / "glmrt"), "launch", "-n", "2", "--"]
        cases = [("one process", "native", [*me, str(nat), "1", "1"]),
                 ("tp 2", "native", [*launch, *me, str(nat), "2", "1"]),
                 ("tp 2", "transformers", [*launch, *me, str(hf), "2", "1"]),
                 ("pp 2", "native", [*launch, *me, str(nat), "1", "2"]),
                 ("pp 2", "transformers", [*launch, *me, str(hf), "1", "2"])]
        results = {"model": "98M GLM-4-shaped (hidden 768, 12 layers, vocabulary 16384), fp32",
                   "weights_mb": round(weights_mb, 1), "date": time.strftime("%Y-%m-%d"), "cases": []}
        print(f"weights: {weights_mb:.0f} MB")
        print(f"{'layout':<12} {'checkpoint':<13} {'rank':>4} {'before MB':>10} {'peak MB':>8} {'model MB':>9}")
        for layout, fmt, cmd in cases:
            for r in run(cmd):
                r.update(layout=layout, checkpoint=fmt, model_mb=r["peak_mb"] - r["before_mb"])
                results["cases"].append(r)
                print(f"{layout:<12} {fmt:<13} {r['rank']:>4} {r['before_mb']:>10.0f} {r['peak_mb']:>8.0f} "
                      f"{r['model_mb']:>9.0f}", flush=True)
    one = results["cases"][0]["model_mb"]
    for r in results["cases"]:
        r["vs_one_process"] = round(r["model_mb"] / one, 3)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
