"""Run under ``mpiexec -n N``: every (tp, pp, dp) layout of N ranks against the single-process model.

For each tiny config and layout it checks, on every rank, against a single-process model
built from the same weights in the same process:

* forward logits (full logits on every rank);
* one training step: loss, and the gathered gradients of every parameter;
* greedy generation: tokens equal to the single-process ones and equal on every rank; the
  KV cache of a pipeline stage holds that stage's layers only.

Tolerances (fp32): logits and loss ``|x - ref| <= 2e-5 + 1e-4 |ref|``; gradients
``|g - ref| <= 1e-6 + 1e-4 |ref|`` (their scale is ~1e-3). The parallel model computes
the same sums split into partial sums (row-parallel all-reduce, vocab-parallel softmax
statistics, micro-batch accumulation); each split changes only the order of fp32
additions, a relative error of a few ulp (1.2e-7) per reduction, amplified by at most a
few layers here. The measured worst absolute errors are in each RESULT line (``*_err``): ~1e-7.

Prints one ``RESULT {json}`` line per check from rank 0 and exits non-zero on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from glm_runtime.core.build import build_model, random_state  # noqa: E402
from glm_runtime.core.generation import SamplingConfig, generate  # noqa: E402
from glm_runtime.core.masks import prefill_inputs  # noqa: E402
from glm_runtime.core.presets import preset  # noqa: E402
from glm_runtime.core.registry import get_backend  # noqa: E402
from glm_runtime.parallel import bootstrap  # noqa: E402
from glm_runtime.parallel.data import wrap_ddp, wrap_fsdp  # noqa: E402
from glm_runtime.parallel.model import ParallelModel
from glm_runtime.parallel.pipeline import PipelineTrainer  # noqa: E402
from glm_runtime.parallel.topology import get_topology  # noqa: E402

LOGIT_TOL = (2e-5, 1e-4)
GRAD_TOL = (1e-6, 1e-4)

SMALL_130B_TOKENS = dict(mask_token_id=996, gmask_token_id=997, smask_token_id=998, sop_token_id=999,
                         eop_token_id=1000, eos_token_ids=[1000], pad_token_id=0)
CONFIGS = {
    # grouped KV heads (2 groups: fewer than tp=4), blocked QKV, vocab 1003 not divisible by 2 or 4,
    # 3 layers not divisible by pp=2
    "chatglm2": lambda: preset("tiny-chatglm2", vocab_size=1003, num_layers=3),
    # GLM-130B style: per-head QKV, DeepNorm, GeGLU, tied embeddings, prefix attention; vocab 1002 (not / 4)
    "glm-130b": lambda: preset("tiny-glm-130b", vocab_size=1002, num_layers=3, **SMALL_130B_TOKENS),
    # 2D RoPE, non-gated tanh GeLU
    "chatglm-6b": lambda: preset("tiny-chatglm-6b", vocab_size=1002, num_layers=2, **SMALL_130B_TOKENS),
}


def batch(cfg, B=4, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 990, (B, T), generator=g)
    att = torch.ones(B, T, dtype=torch.long)
    att[1, :2] = 0  # one left-padded row
    ids[1, :2] = cfg.pad_token_id
    if cfg.attention == "prefix":  # a blank-infilling prompt: context, [gMASK], <sop>
        ids[:, -2] = cfg.gmask_token_id
        ids[:, -1] = cfg.sop_token_id
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return ids, att, targets


def close(a, b, tol):
    atol, rtol = tol
    err = (a.float() - b.float()).abs()
    ok = bool((err <= atol + rtol * b.float().abs()).all())
    return ok, float(err.max()) if err.numel() else 0.0


def check_layout(name, cfg, tp, pp, dp, backend, schedule, ends_lighter):
    topo = get_topology(tp, pp, dp, backend)
    rank = topo.rank
    state = random_state(cfg, seed=7)
    ref = build_model(cfg, state, backend)
    ids, att, targets = batch(cfg)
    pos, mask, _ = prefill_inputs(cfg, ids, att)
    res = {"config": name, "tp": tp, "pp": pp, "dp": dp, "schedule": schedule if pp > 1 else None,
           "data_parallel": ("fsdp2" if schedule == "fsdp" else "ddp") if dp > 1 else None}

    # ---- forward logits
    pm = ParallelModel(build_model(cfg, state, backend), topo, ends_lighter=ends_lighter, backend=backend)
    with torch.inference_mode():
        want = ref(ids, pos, mask)
        got = pm(ids, pos, mask)
    ok_logits, res["logits_err"] = close(got, want, LOGIT_TOL)

    # ---- greedy generation
    s = SamplingConfig(max_new_tokens=6, stop_token_ids=[])
    want_tok = generate(ref, ids, att, s, cfg.pad_token_id)
    got_tok = generate(pm, ids, att, s, cfg.pad_token_id)
    every = [torch.empty_like(got_tok) for _ in range(topo.world_size)]
    dist.all_gather(every, got_tok)
    ok_tokens = torch.equal(got_tok, want_tok) and all(torch.equal(e, got_tok) for e in every)
    # a stage's KV cache holds its own layers only
    ok_cache = sorted(pm.new_cache(1, 4).k) == pm.layer_ids == list(range(*pm.bounds[topo.pp_rank]))

    # ---- one training step: reference on the full batch
    ref.requires_grad_(True)
    loss_ref = torch.nn.functional.cross_entropy(ref(ids, pos, mask).reshape(-1, cfg.vocab_size),
                                                 targets.reshape(-1))
    loss_ref.backward()
    grads_ref = {k: p.grad for k, p in ref.named_parameters()}

    pm.requires_grad_(True)
    rows = slice(topo.dp_rank * len(ids) // dp, (topo.dp_rank + 1) * len(ids) // dp)
    b_ids, b_tg, b_pos, b_mask = ids[rows], targets[rows], pos[rows], mask[rows]
    if pp == 1:
        net = wrap_fsdp(pm, topo) if schedule == "fsdp" else wrap_ddp(pm, topo)
        loss = pm.loss(net(b_ids, b_pos, b_mask, gather=False), b_tg)
        loss.backward()
        pm.finalize_grads()
        loss = loss.detach()
    else:
        trainer = PipelineTrainer(pm, microbatches=2, schedule=schedule,
                                  data_parallel="ddp" if dp > 1 else None)
        loss = trainer.step(b_ids, b_tg, b_pos, b_mask)
    loss = loss.clone()
    dist.all_reduce(loss)
    loss /= topo.world_size  # every rank holds its dp replica's loss: the mean over ranks is over replicas
    ok_loss, res["loss_err"] = close(loss, loss_ref.detach(), LOGIT_TOL)
    full = pm.gather_full(grads=True)
    ok_grads = True
    if rank == 0:
        missing = sorted(set(grads_ref) - set(full))
        if missing:
            ok_grads, res["missing"] = False, missing
        worst = 0.0
        for k, g in grads_ref.items():
            if k in full:
                ok, err = close(full[k], g, GRAD_TOL)
                worst = max(worst, err)
                if not ok:
                    ok_grads = False
                    res.setdefault("bad_grads", []).append(k)
        res["grad_err"] = worst
    flags = torch.tensor([ok_logits, ok_tokens, ok_loss, ok_grads, ok_cache], dtype=torch.int)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    res.update(logits=bool(flags[0]), tokens=bool(flags[1]), loss=bool(flags[2]), grads=bool(flags[3]),
               cache=bool(flags[4]))
    res["subgroup_s"] = topo.creation_s
    return res


def check_load_model(backend, tp, pp, workdir):
    """The public API: load_model(path, tp=...) inside the job equals load_model(path)."""
    from glm_runtime.api import load_model
    from glm_runtime.converters import native

    cfg = CONFIGS["chatglm2"]()
    rank = dist.get_rank()
    path = [None]
    if rank == 0:
        path[0] = os.path.join(workdir, f"ckpt-tp{tp}-pp{pp}")
        native.save(path[0], cfg, random_state(cfg, seed=3), overwrite=True)
    dist.broadcast_object_list(path, src=0)
    ids, att, _ = batch(cfg)
    m = load_model(path[0], backend=backend, tp=tp, pp=pp)
    from glm_runtime.converters.detect import load_checkpoint

    _, c2, st, _ = load_checkpoint(path[0])  # in-process single-model reference
    single = build_model(c2, st, backend)
    with torch.inference_mode():
        want = single(ids, *prefill_inputs(cfg, ids, att)[:2])
    ok_l, err = close(m(ids, attention_mask=att), want, LOGIT_TOL)
    a = m.generate(ids, attention_mask=att, max_new_tokens=5)
    every = [torch.empty_like(a) for _ in range(dist.get_world_size())]
    dist.all_gather(every, a)
    ok_t = all(torch.equal(e, a) for e in every)
    with torch.inference_mode():
        b = generate(single, ids, att, SamplingConfig(max_new_tokens=5, stop_token_ids=cfg.eos_token_ids),
                     cfg.pad_token_id)
    ok_t = ok_t and torch.equal(a, b)
    flags = torch.tensor([ok_l, ok_t], dtype=torch.int)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return {"config": "load_model", "tp": tp, "pp": pp, "logits": bool(flags[0]), "tokens": bool(flags[1]),
            "logits_err": err}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True,
                    help="tp,pp,dp[:1f1b|gpipe|fsdp];... for this world size (fsdp: FSDP2 instead of DDP, pp=1)")
    ap.add_argument("--configs", default="chatglm2,glm-130b")
    ap.add_argument("--load-model", default="", help="tp,pp: also check load_model(path, tp=, pp=)")
    ap.add_argument("--workdir", default=".", help="where rank 0 writes the checkpoint for --load-model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    backend = get_backend("cpu")
    ctx = bootstrap.init(backend)
    failed = False
    with bootstrap.fail_fast("parallel checks"):
        results = []
        for spec in args.layouts.split(";"):
            sizes, _, schedule = spec.partition(":")
            tp, pp, dp = (int(x) for x in sizes.split(","))
            for name in args.configs.split(","):
                results.append(check_layout(name, CONFIGS[name](), tp, pp, dp, backend, schedule or "1f1b",
                                            ends_lighter=(schedule == "gpipe")))
        if args.load_model:
            tp, pp = (int(x) for x in args.load_model.split(","))
            results.append(check_load_model(backend, tp, pp, args.workdir))
        for r in results:
            good = all(r.get(k, True) for k in ("logits", "tokens", "loss", "grads"))
            failed |= not good
            if ctx.rank == 0:
                print("RESULT " + json.dumps(r), flush=True)
        dist.barrier()
    bootstrap.shutdown()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
