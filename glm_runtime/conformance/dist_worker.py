"""One rank of the kit's two-process check (run by :func:`glm_runtime.conformance.dist_check.run`).

Each rank runs a tensor-parallel GLM block with the target backend's kernels on its own
device: attention heads and MLP columns split across ranks (Megatron's column/row
split), partial outputs summed with ``all_reduce`` and per-head attention outputs
collected with ``all_gather`` over the backend's distributed backend (``gloo`` when the
kernels run on host tensors). The result must match the same block computed by the
reference ops in one process, within ``n_ops`` times the contract tolerance.

Prints one JSON line ``{"rank": r, "ok": bool, "detail": str}``; exit status 0 when ok.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from glm_runtime.core.ops import reference as R
from glm_runtime.core.ops.contract import tolerance

from .cases import _prefix_mask
from .target import resolve

B, T, H, NH, D, F = 2, 7, 32, 4, 8, 24


def _weights():
    g = torch.Generator().manual_seed(7)
    w = {"x": torch.randn(B, T, H, generator=g), "n1": 1 + 0.1 * torch.randn(H, generator=g),
         "qkv": 0.2 * torch.randn(3 * NH * D, H, generator=g), "o": 0.2 * torch.randn(H, NH * D, generator=g),
         "n2": 1 + 0.1 * torch.randn(H, generator=g), "fc1": 0.2 * torch.randn(2 * F, H, generator=g),
         "fc2": 0.2 * torch.randn(H, F, generator=g)}
    pos = torch.arange(T).float()[None].expand(B, T)
    inv = 1.0 / (10000 ** (torch.arange(D // 4).float() / (D // 4)))
    ang = pos[..., None] * inv  # interleaved partial rotary: D/4 pairs on D/2 features
    w["cos"], w["sin"] = ang.cos(), ang.sin()
    w["mask"] = _prefix_mask(B, T, pads=[0, 2], ctxs=[3, 2])
    return w


def block(ops, w, heads):
    """Attention over the given heads: (this rank's partial output projection, per-head
    attention outputs [B, len(heads), T, D])."""
    x = w["x"]
    h = ops["rms_norm"](x, w["n1"], 1e-5)
    rows = torch.cat([torch.arange(i * D, (i + 1) * D) + part * NH * D for part in range(3) for i in heads])
    qkv = ops["linear"](h, w["qkv"][rows], None)
    q, k, v = qkv.view(B, T, 3, len(heads), D).unbind(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q = ops["rotary"](q, w["cos"], w["sin"], "interleaved")
    k = ops["rotary"](k, w["cos"], w["sin"], "interleaved")
    a = ops["attention"](q, k, v, w["mask"], 1 / math.sqrt(D), None, 1.0)
    ocols = torch.cat([torch.arange(i * D, (i + 1) * D) for i in heads])
    attn_part = ops["linear"](a.transpose(1, 2).reshape(B, T, -1), w["o"][:, ocols], None)
    return attn_part, a


def mlp(ops, w, y, cols):
    """The gated MLP on the given ffn columns: this rank's partial fc2 output."""
    m = ops["rms_norm"](y, w["n2"], 1e-5)
    u = ops["linear"](m, torch.cat((w["fc1"][cols], w["fc1"][F + cols])), None)
    return ops["linear"](ops["glu"](u, "swiglu"), w["fc2"][:, cols], None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend")
    p.add_argument("--backend-object")
    p.add_argument("--host", action="store_true")
    p.add_argument("--dtypes")
    a = p.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    target = resolve(a.backend, a.backend_object, a.host, a.dtypes)
    b = target.backend
    dev = torch.device("cpu") if a.host else b.setup_process(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("gloo" if a.host else b.dist_backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    half = [d for d in (torch.float16, torch.bfloat16) if d in target.dtypes]
    dtype = half[0] if half else torch.float32
    needed = ("rms_norm", "linear", "rotary", "attention", "glu")
    ops = {n: (target.kernels[n].fn if n in target.kernels and target.kernels[n].supports(dtype)
               else getattr(R, n)) for n in needed}
    w32 = _weights()
    w = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in w32.items()}
    per = NH // world
    heads = list(range(rank * per, (rank + 1) * per))
    cols = torch.arange(rank * F // world, (rank + 1) * F // world, device=dev)
    attn_part, a_heads = block(ops, w, heads)
    dist.all_reduce(attn_part)
    y = w["x"] + attn_part
    mlp_part = mlp(ops, w, y, cols)
    dist.all_reduce(mlp_part)
    out = (y + mlp_part).float().cpu()
    gathered = [torch.empty_like(a_heads) for _ in range(world)]
    dist.all_gather(gathered, a_heads.contiguous())
    a_all = torch.cat(gathered, 1).float().cpu()

    # the same block in one process, reference ops, fp32, on the dtype-rounded weights
    ref_ops = {n: getattr(R, n) for n in needed}
    wr = {k: (v.to(dtype).float() if v.is_floating_point() else v) for k, v in w32.items()}
    ref_attn, ref_a = block(ref_ops, wr, list(range(NH)))
    ref_y = wr["x"] + ref_attn
    ref_out = ref_y + mlp(ref_ops, wr, ref_y, torch.arange(F))
    atol, rtol = tolerance(dtype)
    n_ops = 12
    res = {}
    for name, got, ref in (("block output", out, ref_out), ("all_gather of heads", a_all, ref_a)):
        err = (got - ref).abs()
        ok = bool((err <= n_ops * (atol + rtol * ref.abs())).all())
        res[name] = (ok, float(err.max()))
    dist.barrier()
    dist.destroy_process_group()
    ok = all(v[0] for v in res.values())
    detail = f"{b.name} over {'gloo' if a.host else b.dist_backend} in {dtype}: " + ", ".join(
        f"{k} max err {v[1]:.3g}{'' if v[0] else ' (beyond bound)'}" for k, v in res.items())
    print(json.dumps({"rank": rank, "ok": ok, "detail": detail}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
