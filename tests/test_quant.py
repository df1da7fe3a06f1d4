"""Weight-only INT8/INT4 quantization (GLM-130B / ChatGLM scheme) and the CPU low-bit kernels.

* quantize -> dequantize error is bounded by the scheme: |w - w_hat| <= scale/2 per row
  (round to nearest; the fp16 scale never makes |w|/scale exceed qmax + 1/2).
* the INT4 byte layout is checked by hand (even input element in the high nibble).
* the CPU kernels (aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu) match the
  dequantise-then-matmul reference op within the op contract's fp32 tolerance.
* a quantized model equals the float model with dequantised weights (1e-4 on logits),
  and its logit error against the fp32 model is reported.
"""
from __future__ import annotations

import json

import pytest
import torch

from glm_runtime import load_model
from glm_runtime.backends.cpu import quant_kernels
from glm_runtime.cli.main import main
from glm_runtime.converters import chatglm, native
from glm_runtime.converters.quantize import dequantize_state, quantize_state
from glm_runtime.core.build import random_state
from glm_runtime.core.ops import reference
from glm_runtime.core.ops.contract import quantized_linear_slack, tolerance
from glm_runtime.core.presets import preset
from glm_runtime.core.quant import dequantize, pack_int4, quantize, unpack_int4


@pytest.mark.parametrize("bits", [8, 4])
def test_error_bound_per_row(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    q, s = quantize(w, bits)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (64,)
    assert q.shape == (64, 96 if bits == 8 else 48)
    vals = unpack_int4(q) if bits == 4 else q
    assert int(vals.abs().max()) <= 2 ** (bits - 1) - 1
    err = (w - dequantize(q, s, bits)).abs()
    bound = s.float()[:, None] / 2
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert float((err / bound).max()) > 0.5  # the bound is attained in order of magnitude: a real check


def test_int4_nibble_order_by_hand():
    w = torch.tensor([[3.0, -2.0, -7.0, 5.0]])  # absmax 7 -> scale 1, q = w
    q, s = quantize(w, 4)
    assert s.tolist() == [1.0]
    assert q.view(torch.uint8).tolist() == [[0x3E, 0x95]]  # (3, -2) -> 0x3E, (-7, 5) -> 0x95
    assert unpack_int4(q).tolist() == [[3, -2, -7, 5]]
    assert torch.equal(pack_int4(unpack_int4(q)), q)


def assert_within_contract(got, x, q, s, bias, bits):
    """The op contract's bound for quantized_linear: the fp32 table plus the slack for
    activations rounded to 8 bits."""
    want = reference.quantized_linear(x, q, s, bias, bits)
    atol, rtol = tolerance(torch.float32)
    bound = atol + rtol * want.abs() + quantized_linear_slack(x, q, s, bits)
    assert got.shape == want.shape and bool(((got - want).abs() <= bound).all()), (got - want).abs().max()


@pytest.mark.parametrize("bits,n,k,block", [(8, 40, 96, None), (4, 48, 96, None), (4, 64, 256, None),
                                            (4, 40, 96, None), (4, 48, 50, None), (4, 48, 96, 32),
                                            (4, 64, 256, 128), (4, 40, 96, 32),
                                            (8, 24, 40, None), (8, 32, 24, None), (8, 16, 72, None)])
def test_kernel_matches_dequantised_reference(bits, n, k, block):
    """Input widths that are multiples of 8 but not 16 (the last three) are where torch's
    bf16 INT8 kernel crashed or returned garbage on AVX-512 processors."""
    g = torch.Generator().manual_seed(n + k)
    q, s = quantize(torch.randn(n, k, generator=g) * 0.02, bits, block)
    bias = torch.randn(n, generator=g) * 0.1
    for shape in ((1, 1, k), (3, 7, k)):
        x = torch.randn(shape, generator=g)
        assert_within_contract(quant_kernels.quantized_linear(x, q, s, bias, bits), x, q, s, bias, bits)


def test_int8_kernel_takes_weights_anywhere_in_memory():
    """A weight 8 bytes past a 64-byte boundary (as in a checkpoint's memory mapping):
    torch's AVX-512 INT8 kernel segfaulted on it until the repacking aligned it."""
    g = torch.Generator().manual_seed(5)
    q0, s = quantize(torch.randn(288, 64, generator=g) * 0.02, 8)
    buf = torch.empty(q0.numel() + 64, dtype=torch.int8)
    start = (-buf.data_ptr()) % 64 + 8
    q = buf[start:start + q0.numel()].view_as(q0)
    q.copy_(q0)
    assert q.data_ptr() % 64 == 8
    x = torch.randn(8, 64, generator=g)
    assert_within_contract(quant_kernels.quantized_linear(x, q, s, None, 8), x, q, s, None, 8)


def test_block_wise_int4_is_more_accurate_than_per_row():
    """Finer scales follow the weights' local range: on weights whose magnitude varies along
    a row, block-wise INT4 errs markedly less than one scale per row."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g) * torch.linspace(0.1, 2.0, 512)
    err = {b: (dequantize(*quantize(w, 4, b), 4) - w).pow(2).mean().sqrt() for b in (None, 32)}
    assert err[32] < 0.6 * err[None]  # measured 0.54


def test_repack_cached_and_invalidated():
    q, s = quantize(torch.randn(48, 64), 4)
    x = torch.randn(2, 64)
    first = quant_kernels._prepare(q, s, 4)
    quant_kernels.quantized_linear(x, q, s, None, 4)
    assert quant_kernels._prepare(q, s, 4) is first  # repacked once
    q.neg_()  # in-place change: the cached form must not be used
    assert_within_contract(quant_kernels.quantized_linear(x, q, s, None, 4), x, q, s, None, 4)


def _small(name, **kw):
    return preset(name, vocab_size=512, eos_token_ids=[2], pad_token_id=0, **kw)


@pytest.mark.parametrize("name", ["tiny-glm-130b", "tiny-chatglm-6b", "tiny-chatglm2", "tiny-glm-4"])
def test_quantized_model_cli_and_logit_error(tmp_path, name, capsys):
    cfg = _small(name)
    sd = random_state(cfg, seed=1)
    native.save(tmp_path / "fp32", cfg, sd)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    fp32 = load_model(tmp_path / "fp32", backend="cpu")(ids)
    errs = {}
    for bits in (8, 4):
        assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / f"q{bits}"), "--bits", str(bits)]) == 0
        m = load_model(tmp_path / f"q{bits}", backend="cpu", strict_ops=True)
        assert "aten._weight_int8pack_mm" in m.op_report()
        ql = m(ids)
        # the same model with the dequantised weights in fp32 (what the kernels compute, up
        # to the bf16 rounding of activations the op contract allows: measured 0.7% of the
        # largest logit; a wrong layout or scale is off by the order of the logits). The
        # CLI's default scheme: INT4 scales per block of 32, an INT8 output projection.
        qc, qs = quantize_state(cfg, sd, bits, block=32 if bits == 4 else None, head_bits=8)
        assert m.config == qc
        dc, ds = dequantize_state(qc, qs)
        native.save(tmp_path / f"dq{bits}", dc, ds)
        dq = load_model(tmp_path / f"dq{bits}", backend="cpu")(ids)
        assert (ql - dq).abs().max().item() < 0.02 * dq.abs().max().item()
        err = (ql - fp32).abs().max().item() / fp32.abs().max().item()
        with capsys.disabled():
            print(f"\n{name} INT{bits}: max |logit - fp32| / max |fp32| = {err:.2e}")
        errs[bits] = err
    # Random tiny models are no accuracy benchmark (docs/families.md has the figures); the
    # exactness check is the dequantised comparison above. Here: INT8 close, INT4 bounded
    # (block-wise INT4 comes close to per-row INT8 on these 64-wide rows).
    assert errs[8] < 0.02 and errs[4] < 0.5
    assert "INT4" in capsys.readouterr().out


def test_prequantized_chatglm_checkpoint_loads(tmp_path):
    cfg = preset("tiny-chatglm2")
    qc, qs = quantize_state(cfg, random_state(cfg, seed=2), 4)
    chatglm.write(tmp_path / "int4", qc, qs)
    hfc = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert hfc["quantization_bit"] == 4
    from glm_runtime.converters.tensor_io import read_state_dict

    files = read_state_dict(tmp_path / "int4")
    k = "transformer.encoder.layers.0.self_attention.query_key_value"
    assert files[k + ".weight"].dtype == torch.int8 and files[k + ".weight_scale"].dtype == torch.float16
    c, back = chatglm.read(tmp_path / "int4")
    assert c.quantization_bits == 4 and all(torch.equal(back[x], qs[x]) for x in qs)
    native.save(tmp_path / "nat", qc, qs)
    ids = [[qc.gmask_token_id, qc.sop_token_id, 30, 31]]
    a = load_model(tmp_path / "int4", backend="cpu")(ids)
    b = load_model(tmp_path / "nat", backend="cpu")(ids)
    assert torch.equal(a, b)


def test_quantize_twice_is_an_error(tmp_path, capsys):
    cfg = _small("tiny-chatglm2")
    qc, qs = quantize_state(cfg, random_state(cfg), 8)
    native.save(tmp_path / "q", qc, qs)
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "qq"), "--bits", "4"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "qq").exists()


def test_prequantized_chatglm6b_int8_roundtrip(tmp_path):
    cfg = preset("tiny-chatglm-6b", rope_fp16=True, num_layers=1)
    qc, qs = quantize_state(cfg, random_state(cfg, seed=3), 8)
    chatglm.write(tmp_path / "int8", qc, qs)
    from glm_runtime.converters.tensor_io import read_state_dict

    files = read_state_dict(tmp_path / "int8")
    assert files["transformer.layers.0.mlp.dense_4h_to_h.weight"].dtype == torch.int8
    assert files["transformer.layers.0.mlp.dense_4h_to_h.bias"].dtype == torch.float32  # biases stay float
    c, back = chatglm.read(tmp_path / "int8")
    assert c.quantization_bits == 8 and set(back) == set(qs) and all(torch.equal(back[x], qs[x]) for x in qs)
