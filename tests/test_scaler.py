"""FP16 dynamic loss scaling: overflow -> skip the step, lower the scale, recover.

The fp16 runs use a real half-precision model (fp16 parameters, activations and
gradients) with the reference ops, which compute in fp32 inside and round their outputs
to fp16 (softmax in fp32): on this CPU the cpu backend itself only computes in fp32, so
the fp16 path is exercised through the reference op table.
"""
from __future__ import annotations

import math

import pytest
import torch

from glm_runtime.core.model import GLMModel
from glm_runtime.core.ops import OpTable
from glm_runtime.core.presets import preset
from glm_runtime.training.collator import Collator, ObjectiveConfig, SpecialIds
from glm_runtime.training.data import TokenStream
from glm_runtime.training.optim import OptimConfig
from glm_runtime.training.scaler import LossScaler, ScalerConfig
from glm_runtime.training.stability import deepnorm_state
from glm_runtime.training.trainer import TrainConfig, Trainer

V = 64
IDS = SpecialIds(mask=V - 5, gmask=V - 4, smask=V - 3, sop=V - 2, eop=V - 1, pad=0)


def test_scaler_backoff_growth_and_floor():
    s = LossScaler(True, ScalerConfig(init_scale=1024, growth_interval=3, min_scale=256))
    s.update(True)
    assert s.scale == 512 and s.skipped == 1
    s.update(False), s.update(False)
    assert s.scale == 512
    s.update(False)
    assert s.scale == 1024  # three clean steps in a row
    s.update(True), s.update(True), s.update(True)
    assert s.scale == 256  # never below min_scale
    st = s.state_dict()
    t = LossScaler(True, ScalerConfig(init_scale=1024, growth_interval=3, min_scale=256))
    t.load_state_dict(st)
    assert t.state_dict() == st


def test_static_scaler_for_fp32_and_bf16():
    s = LossScaler(False)
    s.update(True)
    assert s.scale == 1.0 and s.skipped == 1


def _model(dtype):
    cfg = preset("tiny-glm-130b", vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                 head_dim=16, rope_dim=16, ffn_hidden_size=48, max_position_embeddings=64, mask_token_id=V - 5,
                 gmask_token_id=V - 4, smask_token_id=V - 3, sop_token_id=V - 2, eop_token_id=V - 1,
                 eos_token_ids=[V - 1], pad_token_id=0)
    m = GLMModel(cfg, OpTable("reference", {}, dtype, strict=False), dtype=dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in deepnorm_state(cfg, seed=0).items()})
    return m


def _trainer(tmp_path, dtype, precision, scaler_cfg, steps=30):
    g = torch.Generator().manual_seed(0)
    # a learnable stream: a repeating pattern of 20 tokens plus noise-free structure
    pattern = torch.randint(1, V - 5, (20,), generator=g)
    stream = TokenStream(pattern.repeat(200).numpy().astype("uint16"), eod_id=1)
    col = Collator(stream, 32, ObjectiveConfig(mask_share=0.5, pack=1), IDS, seed=0)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=steps, seq_len=32, precision=precision, save_interval=1000,
                      optim=OptimConfig(lr=3e-3, warmup_steps=2, batch_size=4, micro_batch_size=4),
                      scaler=scaler_cfg)
    return Trainer(_model(dtype), col, cfg, progress=False)


def test_planted_fp16_overflow_is_skipped_and_training_recovers(tmp_path):
    tr = _trainer(tmp_path, torch.float16, "fp16", ScalerConfig(init_scale=2.0 ** 10, growth_interval=4))
    assert tr.master.copies and tr.model.embed.weight.dtype == torch.float16
    plant_at = 6
    target = tr.model.layers[1].mlp.fc1.weight

    def poison(grad):  # an fp16 overflow in one gradient of one step
        return torch.full_like(grad, float("inf")) if tr.step == plant_at - 1 else grad

    target.register_hook(poison)
    recs, before = [], None
    while tr.step < 20:
        if tr.step == plant_at - 1:
            before = {k: v.clone() for k, v in tr.master.state_dict().items()}
            adam_step = {id(p): float(s["step"]) for p, s in tr.opt.state.items()}
        recs.append(tr.train_step())
        if tr.step == plant_at:
            after = tr.master.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
            assert {id(p): float(s["step"]) for p, s in tr.opt.state.items()} == adam_step
    bad = recs[plant_at - 1]
    assert bad["skipped"] and math.isinf(bad["grad_norm"])
    assert [r["skipped"] for r in recs].count(True) == 1
    # the scale halves at the overflow, then grows back every 4 clean steps
    assert recs[plant_at]["loss_scale"] == bad["loss_scale"] / 2
    assert recs[plant_at + 4]["loss_scale"] == bad["loss_scale"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs[plant_at:])
    assert recs[-1]["loss"] < recs[plant_at]["loss"] - 0.3, "training did not go on after the skipped step"
    # fp16 model weights are the rounded fp32 master weights
    for p, m in zip(tr.master.model, tr.master.master):
        assert torch.equal(p, m.detach().half())


def test_natural_fp16_overflow_from_a_too_large_scale(tmp_path):
    """A scale of 2^30 overflows fp16 gradients for real; the scaler halves it at every
    overflow until the gradients fit in fp16, then trains normally."""
    tr = _trainer(tmp_path, torch.float16, "fp16", ScalerConfig(init_scale=2.0 ** 30, growth_interval=1000),
                  steps=60)
    recs = [tr.train_step() for _ in range(30)]
    skipped = [r["skipped"] for r in recs]
    first_ok = skipped.index(False)
    assert first_ok >= 5 and skipped[:first_ok] == [True] * first_ok
    assert skipped[first_ok:].count(True) <= 3  # later overflows are rare and each one is skipped too
    for a, b in zip(recs, recs[1:]):
        assert b["loss_scale"] == (a["loss_scale"] / 2 if a["skipped"] else a["loss_scale"])
    assert recs[-1]["loss"] < recs[first_ok]["loss"] - 0.3


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_fp32_and_bf16_train_without_scaling(tmp_path, precision, dtype):
    tr = _trainer(tmp_path, dtype, precision, ScalerConfig())
    recs = [tr.train_step() for _ in range(25)]
    assert all(r["loss_scale"] == 1.0 and not r["skipped"] for r in recs)
    assert tr.master.copies == (dtype != torch.float32)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5


def test_fp16_tracks_fp32(tmp_path):
    """Mixed precision follows the fp32 run: same data, same init; the first losses agree
    to fp16 accuracy (forward activations rounded to 11 bits: |diff| < 1e-2 nats)."""
    a = _trainer(tmp_path / "a", torch.float32, "fp32", ScalerConfig())
    b = _trainer(tmp_path / "b", torch.float16, "fp16", ScalerConfig(init_scale=2.0 ** 8))
    for _ in range(5):
        ra, rb = a.train_step(), b.train_step()
        assert not rb["skipped"]
        assert abs(ra["loss"] - rb["loss"]) < 1e-2
