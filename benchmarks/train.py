"""Training throughput: tokens/s and the fraction of this machine's fp32 matmul peak that a
training step reaches.

The peak is *measured* here, not taken from a data sheet: the median rate of an
``n x n x n`` fp32 matmul (default 1024) with the same thread count as the training step.
A step's useful work is counted analytically for the model of the training config: every
linear (QKV, output, GeGLU/SwiGLU FFN, LM head) and the two attention matmuls over the
whole ``T x T`` score matrix, forward (2 FLOPs per multiply-add) plus backward (2x forward).
Norms, activations, rotary, softmax and the optimiser are not counted: they are memory-bound
and make the gap between the two figures.

    python benchmarks/train.py --config configs/glm-tiny.yaml --steps 10 --threads 1

Data are random ids (throughput does not depend on the text), so no corpus is tokenised.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from glm_runtime.cli.common import read_run_config  # noqa: E402
from glm_runtime.core.build import build_model  # noqa: E402
from glm_runtime.core.config import GLMConfig  # noqa: E402
from glm_runtime.core.presets import PRESETS  # noqa: E402
from glm_runtime.core.registry import get_backend  # noqa: E402
from glm_runtime.training.collator import Collator, ObjectiveConfig, SpecialIds  # noqa: E402
from glm_runtime.training.data import TokenStream  # noqa: E402
from glm_runtime.training.optim import OptimConfig  # noqa: E402
from glm_runtime.training.stability import deepnorm_state  # noqa: E402
from glm_runtime.training.trainer import TrainConfig, Trainer  # noqa: E402


def matmul_peak(n: int, iters: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts)


def step_flops(c: GLMConfig, rows: int, T: int) -> float:
    """Matmul FLOPs of one training step (forward + backward) over ``rows`` x ``T`` tokens."""
    per_tok = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    per_tok += c.hidden_size * c.ffn_hidden_size * (2 if c.gated else 1) + c.ffn_hidden_size * c.hidden_size
    fwd = 2 * rows * T * (c.num_layers * per_tok + c.hidden_size * c.vocab_size)
    fwd += c.num_layers * rows * 2 * (2 * T * T * c.num_heads * c.head_dim)
    return 3 * fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/glm-tiny.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="default: the config's")
    ap.add_argument("--peak-n", type=int, default=1024)
    a = ap.parse_args()
    cfg = read_run_config(a.config)
    threads = a.threads or int(cfg.get("threads") or torch.get_num_threads())
    torch.set_num_threads(threads)
    vocab = int(cfg.get("data", {}).get("vocab_size", 8000))
    m = dict(cfg.get("model") or {})
    base = dict(PRESETS[m.pop("preset", "tiny-glm-130b")])
    n = vocab
    base.update(vocab_size=n + 5, mask_token_id=n, gmask_token_id=n + 1, smask_token_id=n + 2, sop_token_id=n + 3,
                eop_token_id=n + 4, eos_token_ids=[n + 4], pad_token_id=1, torch_dtype="float32", **m)
    config = GLMConfig(**base)
    backend = get_backend(cfg.get("backend"))
    model = build_model(config, deepnorm_state(config, 0), backend, trainable=True)
    T = int(cfg.get("data", {}).get("seq_len", 256))
    optim = OptimConfig(**(cfg.get("optim") or {}))
    optim.batch_warmup_start = None
    ids = SpecialIds(n, n + 1, n + 2, n + 3, n + 4, 1)
    stream = TokenStream(np.random.default_rng(0).integers(3, n, 1_000_000).astype(np.uint16), eod_id=2)
    col = Collator(stream, T, ObjectiveConfig(**(cfg.get("objective") or {})), ids, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(model, col, TrainConfig(run_dir=tmp, steps=a.steps + a.warmup, seq_len=T, optim=optim),
                     progress=False)
        for _ in range(a.warmup):
            tr.train_step()
        times, toks = [], []
        for _ in range(a.steps):
            t = time.perf_counter()
            r = tr.train_step()
            times.append(time.perf_counter() - t)
            toks.append(r["tokens"])
    peak = matmul_peak(a.peak_n)
    dt = statistics.median(times)
    flops = step_flops(config, optim.batch_size, T)
    print(f"machine: {os.cpu_count()} CPU threads visible, torch {torch.__version__}, {threads} thread(s) used, "
          f"backend {backend.name}")
    print(f"model: {config.num_parameters() / 1e6:.2f}M parameters, {config.num_layers} layers, hidden "
          f"{config.hidden_size}, vocab {config.vocab_size}; step = {optim.batch_size} rows x {T} tokens")
    print(f"measured fp32 matmul peak ({a.peak_n}^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"training step: median {dt * 1e3:.0f} ms over {a.steps} steps (min {min(times) * 1e3:.0f}, "
          f"max {max(times) * 1e3:.0f})")
    print(f"throughput: {statistics.median(toks) / dt:.0f} tokens/s (non-padding tokens)")
    print(f"matmul work: {flops / 1e9:.2f} GFLOP/step -> {flops / dt / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / dt / peak:.1f} % of the measured peak")


if __name__ == "__main__":
    main()
