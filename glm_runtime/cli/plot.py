"""``glmrt plot-run``: a run's curves (loss, held-out loss, gradient norms, learning rate,
loss scale, throughput) from its train.jsonl to one PNG."""
from __future__ import annotations

from pathlib import Path

from glm_runtime.core.errors import GLMError
from glm_runtime.training.monitor import LOG, read_log

NAME = "plot-run"
HELP = "plot a training run's curves (train.jsonl) to a PNG"
EXAMPLE = "glmrt plot-run runs/glm-tiny --out docs/glm-tiny-loss.png"


def add_arguments(p):
    p.add_argument("run_dir", help="run directory holding train.jsonl")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--title", help="figure title (default: the run directory's name)")


FIELDS = ("lr", "loss_scale", "tokens_per_s", "batch_size")  # plotted as they are (loss and norms may be "nan")


def _num(v):
    if isinstance(v, (int, float)) or v in ("inf", "nan"):
        try:
            return float(v)
        except OverflowError:  # an integer beyond a float's range
            return float("inf")
    return float("nan")


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    run_dir = Path(args.run_dir)
    recs = read_log(run_dir / LOG)
    if not recs:
        raise GLMError(f"no training records in {LOG}", run_dir)
    for r in recs:
        missing = [k for k in FIELDS if not isinstance(r.get(k), (int, float))]
        if missing:
            raise GLMError(f"the record of step {r['step']} has no number for {missing[0]}: not a glm-runtime "
                           "training log", run_dir / LOG)
    step = [r["step"] for r in recs]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    ax = ax.ravel()
    ax[0].plot(step, [_num(r.get("loss")) for r in recs], lw=0.8, label="train")
    ev = [r for r in recs if "eval_loss" in r]
    if ev:
        ax[0].plot([r["step"] for r in ev], [_num(r["eval_loss"]) for r in ev], "o-", label="held-out")
    ax[0].set(title="loss (cross-entropy, nats/token)", xlabel="step")
    ax[0].legend()
    ax[1].plot(step, [_num(r.get("grad_norm")) for r in recs], lw=0.8, label="total")
    ax[1].plot(step, [_num(r.get("embed_grad_norm")) for r in recs], lw=0.8, label="embedding")
    ax[1].set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
    ax[1].legend()
    ax[2].plot(step, [r["lr"] for r in recs])
    ax[2].set(title="learning rate", xlabel="step")
    ax[3].plot(step, [r["loss_scale"] for r in recs])
    skipped = [r["step"] for r in recs if r.get("skipped")]
    if skipped:
        ax[3].plot(skipped, [r["loss_scale"] for r in recs if r.get("skipped")], "rx", label="skipped step")
        ax[3].legend()
    ax[3].set(title="loss scale", xlabel="step", yscale="log")
    ax[4].plot(step, [r["tokens_per_s"] for r in recs], lw=0.8)
    ax[4].set(title="tokens/s", xlabel="step")
    ax[5].plot(step, [r["batch_size"] for r in recs])
    ax[5].set(title="batch size (rows)", xlabel="step")
    fig.suptitle(args.title or run_dir.name)
    fig.tight_layout()
    out = Path(args.out) if args.out else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(out)
    return 0
