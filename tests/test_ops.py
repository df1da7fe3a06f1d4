"""The reference ops on hand-computed cases, and the cpu kernels against the reference
within the op contract's fp32 tolerance (atol = rtol = 1e-5)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glm_runtime.core import quant
from glm_runtime.core.ops import OPS, OpTable, reference, tolerance
from glm_runtime.core.ops.contract import quantized_linear_slack
from glm_runtime.core.registry import get_backend


def angles(*vals):
    a = torch.tensor(vals, dtype=torch.float32)[None, None]  # [B=1, T=1, n]
    return a.cos(), a.sin()


def test_rotary_interleaved_rotates_pairs_2i_2i_plus_1():
    x = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 6.0])[None, None, None]  # d=6, rot=4, 2 pass through
    cos, sin = angles(math.pi / 2, math.pi)
    out = reference.rotary(x, cos, sin, "interleaved")[0, 0, 0]
    # pair (x0, x1) = (1, 0) by 90 degrees -> (0, 1); pair (0, 1) by 180 -> (0, -1)
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 0.0, -1.0, 5.0, 6.0]), atol=1e-6)


def test_rotary_neox_pairs_j_with_j_plus_half():
    x = torch.tensor([1.0, 2.0, 0.0, 0.0])[None, None, None]
    cos, sin = angles(math.pi / 2, 0.0)
    out = reference.rotary(x, cos, sin, "neox")[0, 0, 0]
    # (x0, x2) = (1, 0) by 90 -> (0, 1); (x1, x3) = (2, 0) by 0 -> unchanged
    assert torch.allclose(out, torch.tensor([0.0, 2.0, 1.0, 0.0]), atol=1e-6)


def test_rotary_2d_halves_use_their_own_angles():
    x = torch.tensor([1.0, 0.0, 1.0, 0.0])[None, None, None]  # two halves of width 2
    cos, sin = angles(math.pi / 2, math.pi)  # first half by position, second by block position
    out = reference.rotary(x, cos, sin, "neox_2d")[0, 0, 0]
    assert torch.allclose(out, torch.tensor([0.0, 1.0, -1.0, 0.0]), atol=1e-6)


def test_attention_gqa_maps_query_head_to_group_i_div_ratio():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 3, 8)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    out = reference.attention(q, k, v, None, 8 ** -0.5)
    for h in range(4):
        g = h // 2
        p = torch.softmax(q[0, h] @ k[0, g].T * 8 ** -0.5, -1)
        assert torch.allclose(out[0, h], p @ v[0, g], atol=1e-6)


def test_attention_mask_true_means_attend_and_layer_scale_is_exact():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)[None, None]
    out = reference.attention(q, k, v, mask, 0.5)
    # row 0 sees only key 0: its output is exactly v[0]
    assert torch.allclose(out[0, :, 0], v[0, :, 0], atol=1e-6)
    scaled = reference.attention(q, k, v, mask, 0.5, layer_scale=7.0)
    assert torch.allclose(out, scaled, atol=1e-6)


def test_attention_mask_value_for_fully_masked_row_is_uniform():
    q, k = torch.zeros(1, 1, 1, 2), torch.randn(1, 1, 3, 2)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]]])
    out = reference.attention(q, k, v, torch.zeros(1, 1, 1, 3, dtype=torch.bool), 1.0, mask_value=-10000.0)
    assert torch.allclose(out[0, 0, 0], v[0, 0].mean(0))


def test_gate_halves():
    u = torch.tensor([[2.0, -1.0]])  # F = 1: first half 2, second half -1
    assert torch.allclose(reference.glu(u, "swiglu"), F.silu(torch.tensor(2.0)) * -1.0)
    assert torch.allclose(reference.glu(u, "geglu"), 2.0 * F.gelu(torch.tensor(-1.0)))


def test_gelu_tanh_formula():
    x = torch.linspace(-4, 4, 17)
    assert torch.allclose(reference.gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-6)


def test_rms_norm():
    x = torch.tensor([[3.0, 4.0]])
    out = reference.rms_norm(x, torch.tensor([1.0, 2.0]), 0.0)
    r = math.sqrt((9 + 16) / 2)
    assert torch.allclose(out, torch.tensor([[3 / r, 8 / r]]))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_bound_and_int4_packing(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    q, scale = quant.quantize(w, bits)
    w_hat = quant.dequantize(q, scale, bits)
    # round-to-nearest: each element within half a step of its row's scale (fp16 scale
    # rounding adds at most 2^-11 relative per step, covered by the 1e-3 slack)
    assert ((w - w_hat).abs() <= scale.float()[:, None] / 2 * (1 + 1e-3) + 1e-7).all()
    if bits == 4:
        assert q.shape == (16, 16)
        unpacked = quant.unpack_int4(q)
        assert unpacked.min() >= -7 and unpacked.max() <= 7
        b = int(q[0, 0]) & 0xFF
        hi, lo = (b >> 4) - 16 * ((b >> 4) > 7), (b & 0xF) - 16 * ((b & 0xF) > 7)
        assert (hi, lo) == (int(unpacked[0, 0]), int(unpacked[0, 1]))  # even element in the high nibble


def _inputs(op, g):
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, T, H, nh, kv, d = 2, 7, 40, 4, 2, 12
    if op in ("linear",):
        return (r(B, T, H), r(24, H), r(24))
    if op == "lm_head":
        return (r(B, T, H), r(50, H))
    if op == "embedding":
        return (torch.randint(0, 50, (B, T), generator=g), r(50, H))
    if op == "layer_norm":
        return (r(B, T, H), r(H), r(H), 1e-5)
    if op == "rms_norm":
        return (r(B, T, H), r(H), 1e-6)
    if op == "glu":
        return (r(B, T, 2 * H), "swiglu")
    if op == "gelu_tanh":
        return (r(B, T, H),)
    if op == "rotary":
        return (r(B, nh, T, d), r(B, T, 4).cos(), r(B, T, 4).sin(), "interleaved")
    if op == "attention":
        m = torch.rand(B, 1, T, T, generator=g) > 0.4
        m |= torch.eye(T, dtype=torch.bool)
        return (r(B, nh, T, d), r(B, kv, T, d), r(B, kv, T, d), m, d ** -0.5, None, 3.0)
    if op == "quantized_linear":
        q, s = quant.quantize(r(24, H), 4)
        return (r(B, T, H), q, s, r(24), 4)
    if op == "cross_entropy":
        return (r(B, T, 50), torch.randint(0, 50, (B, T), generator=g))
    raise AssertionError(op)


@pytest.mark.parametrize("op", sorted(OPS))
def test_cpu_kernels_match_reference_fp32(op):
    kernel = get_backend("cpu").kernels()[op]
    args = _inputs(op, torch.Generator().manual_seed(0))
    atol, rtol = tolerance(torch.float32)
    got, ref = kernel.fn(*args), OPS[op].reference(*args)
    bound = atol + rtol * ref.abs()
    if op == "quantized_linear":  # the contract lets low-bit kernels round activations to 8 bits
        bound = bound + quantized_linear_slack(*args[:3], args[4])
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert bool(((got - ref).abs() <= bound).all())


def test_quantized_linear_slack_catches_a_wrong_kernel():
    """The activation-rounding slack is tight enough that a kernel with a real mistake (one
    row's scale a quarter off; INT4 nibbles swapped) fails it, and kernels that round the
    activations to bf16 or to int8 per block of 32 pass."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 256, generator=g), torch.randn(32, 256, generator=g)
    q, s = quant.quantize(w, 8)
    ref = reference.quantized_linear(x, q, s, None, 8)
    bound = tolerance(torch.float32)[0] + quantized_linear_slack(x, q, s, 8)
    assert bool(((reference.quantized_linear(x.bfloat16().float(), q, s, None, 8) - ref).abs() <= bound).all())
    blocks = x.unflatten(-1, (8, 32))
    step = blocks.abs().amax(-1, keepdim=True) / 127
    x_int8 = ((blocks / step).round() * step).flatten(-2)
    assert bool(((reference.quantized_linear(x_int8, q, s, None, 8) - ref).abs() <= bound).all())
    off = s.clone()
    off[5] = off[5] * 1.25
    assert not bool(((reference.quantized_linear(x, q, off, None, 8) - ref).abs() <= bound).all())
    q4, s4 = quant.quantize(w, 4)
    swapped = quant.pack_int4(quant.unpack_int4(q4).unflatten(-1, (-1, 2)).flip(-1).flatten(-2))
    ref4 = reference.quantized_linear(x, q4, s4, None, 4)
    bound4 = tolerance(torch.float32)[0] + quantized_linear_slack(x, q4, s4, 4)
    assert not bool(((reference.quantized_linear(x, swapped, s4, None, 4) - ref4).abs() <= bound4).all())


def test_op_table_declares_every_op_of_the_contract():
    """OpTable's typed fields (what type checkers and editors see) are exactly the contract's ops."""
    assert set(OpTable.__annotations__) == set(OPS)
    table = OpTable("reference", {}, torch.float32, strict=False)
    assert all(callable(getattr(table, op)) for op in OPS)
