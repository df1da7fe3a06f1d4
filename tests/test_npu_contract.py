"""The Ascend plugin's calls into torch-npu, checked against a fake torch_npu.

No NPU exists here, so ``torch_npu`` is replaced (in ``sys.modules``, for these tests
only) by a module that states the documented signatures of the fused operators the
plugin uses -- parameter names and defaults, dtypes, layouts and shape constraints from
the torch-npu API reference (Ascend Extension for PyTorch, "torch_npu.npu_*" pages) --
and computes the documented math in fp32. Every op of the plugin then runs through the
conformance kit's grid and a tiny-model check: argument plumbing, layout conversions
(BNSD/BSND, r1/r2 broadcasting, the int4 pack), mask polarity (torch-npu masks True =
*excluded*), the prefix sparse mode and dtype casts are all exercised. What this cannot
show -- the real kernels' numerics and speed on a 910 -- is listed in docs/backends.md.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from glm_runtime.conformance.cases import run_grid
from glm_runtime.conformance.model_check import compare
from glm_runtime.conformance.target import Target

HALF = (torch.float16, torch.bfloat16)


class FakeTorchNpu(types.ModuleType):
    """torch_npu as documented, on CPU tensors; records which operators were called and how."""

    def __init__(self, devices=0):
        super().__init__("torch_npu")
        self.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        self.calls: list[tuple[str, dict]] = []
        self.npu = types.SimpleNamespace(device_count=lambda: devices, get_device_name=lambda i=0: "Ascend910B-fake",
                                         set_device=lambda i: None, synchronize=lambda: None)

    # torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
    #   atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647,
    #   inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
    #   gen_mask_parallel=True, sync=False) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)
    def npu_fusion_attention(self, query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
        self.calls.append(("npu_fusion_attention", dict(sparse_mode=sparse_mode, prefix=prefix, layout=input_layout)))
        assert input_layout == "BNSD", "the plugin passes BNSD"
        assert query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert key.dtype == value.dtype == query.dtype
        B, N1, S1, D = query.shape
        N2, S2 = key.shape[1], key.shape[2]
        assert head_num == N1 and N1 % N2 == 0, "head_num is the query heads; N2 must divide N1"
        assert D % 16 == 0 and D <= 512, "D: a multiple of 16, at most 512"
        assert keep_prob == 1.0 and pse is None and padding_mask is None
        masked = torch.zeros(B, 1, S1, S2, dtype=torch.bool)
        if sparse_mode == 0:
            if atten_mask is not None:
                assert atten_mask.dtype == torch.bool
                assert atten_mask.dim() == 4 and atten_mask.shape[1] in (1, N1) and atten_mask.shape[2:] == (S1, S2)
                masked = atten_mask.expand(B, -1, S1, S2)
        elif sparse_mode == 5:  # prefix, uncompressed: rightDownCausal plus a left rectangle of width prefix[b]
            assert atten_mask is not None and atten_mask.dim() == 4, "mode 5 takes a BNSS/B1SS atten_mask"
            assert prefix is not None and len(prefix) == B
            i = torch.arange(S1)[:, None] + (S2 - S1)
            j = torch.arange(S2)[None, :]
            allowed = (j <= i)[None] | (j[None] < torch.tensor(prefix)[:, None, None])
            masked = ~allowed[:, None]
        else:
            raise NotImplementedError(f"sparse_mode {sparse_mode} is not used by the plugin")
        k = key.float().repeat_interleave(N1 // N2, 1)
        v = value.float().repeat_interleave(N1 // N2, 1)
        s = (query.float() @ k.transpose(-1, -2)) * scale
        s = s.masked_fill(masked, float("-inf"))
        p = torch.softmax(s, -1)
        out = (p @ v).to(query.dtype)
        return out, s.amax(-1), p.sum(-1), torch.empty(0), 0, 0, 0

    # torch_npu.npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)
    def npu_rms_norm(self, x, gamma, epsilon=1e-06):
        self.calls.append(("npu_rms_norm", {}))
        assert gamma.dtype == x.dtype, "gamma must have the input's dtype"
        assert gamma.shape == x.shape[-gamma.dim():]
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd

    # torch_npu.npu_rotary_mul(Tensor input, Tensor r1, Tensor r2, str rotary_mode='half') -> Tensor
    def npu_rotary_mul(self, input, r1, r2, rotary_mode="half"):
        self.calls.append(("npu_rotary_mul", dict(mode=rotary_mode, r1=tuple(r1.shape))))
        assert input.dim() == r1.dim() == r2.dim() == 4, "4-D input, r1, r2"
        assert input.dtype == r1.dtype == r2.dtype
        assert input.shape[-1] % 2 == 0 and input.shape[-1] < 896
        assert r1.shape == r2.shape and all(a in (1, b) for a, b in zip(r1.shape, input.shape))
        assert r1.shape[-1] == input.shape[-1]
        assert input.is_contiguous()
        x = input.float()
        if rotary_mode == "half":
            x1, x2 = x.chunk(2, -1)
            rot = torch.cat((-x2, x1), -1)
        elif rotary_mode == "interleave":
            rot = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
        else:
            raise ValueError(f"rotary_mode {rotary_mode!r}")
        return (x * r1.float() + rot * r2.float()).to(input.dtype)

    # torch_npu.npu_swiglu(Tensor input, int dim=-1) -> Tensor ; swish(A) * B, A the first half
    def npu_swiglu(self, input, dim=-1):
        self.calls.append(("npu_swiglu", {}))
        assert input.is_contiguous(), "non-contiguous input is not supported"
        a, b = input.float().chunk(2, dim)
        return (a * torch.sigmoid(a) * b).to(input.dtype)

    # torch_npu.npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0) -> Tensor
    def npu_convert_weight_to_int4pack(self, weight, inner_k_tiles=0):
        self.calls.append(("npu_convert_weight_to_int4pack", {}))
        assert weight.dtype == torch.int32 and weight.dim() == 2 and weight.is_contiguous()
        assert weight.shape[-1] % 8 == 0 and int(weight.min()) >= -8 and int(weight.max()) <= 7
        nib = (weight & 0xF).view(weight.shape[0], -1, 8)  # this fake's own (opaque) order
        packed = torch.zeros(nib.shape[:2], dtype=torch.int64)
        for i in range(8):
            packed |= nib[..., i].long() << (4 * i)
        return (packed - ((packed >> 31) << 32)).to(torch.int32)  # as signed 32-bit

    def _unpack(self, packed):
        p = packed.long() & 0xFFFFFFFF
        vals = torch.stack([(p >> (4 * i)) & 0xF for i in range(8)], -1)
        vals = torch.where(vals >= 8, vals - 16, vals)
        return vals.flatten(-2)

    # npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor? antiquant_offset=None,
    #   Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? bias=None, int antiquant_group_size=0)
    def npu_weight_quant_batchmatmul(self, x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                     quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0):
        self.calls.append(("npu_weight_quant_batchmatmul", dict(wdtype=weight.dtype)))
        assert x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16), "x: 2-D (M, K), fp16/bf16"
        assert antiquant_scale.dtype == x.dtype, "antiquant_scale must have x's dtype"
        M, K = x.shape
        if weight.dtype == torch.int8:
            assert weight.shape[0] == K, "weight (K, N)"
            w = weight.float()
        else:
            assert weight.dtype == torch.int32, "int4 weights come packed in int32"
            w = self._unpack(weight.transpose(-1, -2)).transpose(-1, -2).float()  # (n, k/8) pack, transposed
            assert w.shape[0] == K
        N = w.shape[1]
        if antiquant_group_size:  # per group of input rows: scale (ceil(K / group), N), group a multiple of 32
            g = antiquant_group_size
            assert g % 32 == 0 and tuple(antiquant_scale.shape) == (-(-K // g), N)
            scale = antiquant_scale.float().repeat_interleave(g, 0)[:K]
        else:
            assert antiquant_scale.numel() == N
            scale = antiquant_scale.float().reshape(1, N)
        y = x.float() @ (w * scale)
        if bias is not None:
            assert bias.dtype == x.dtype and bias.shape[-1] == N
            y = y + bias.float()
        return y.to(x.dtype)


@pytest.fixture
def fake_npu(monkeypatch):
    fake = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake


def test_every_npu_op_conforms_through_the_documented_signatures(fake_npu):
    from glm_runtime.backends.npu.plugin import NPUBackend

    kernels = NPUBackend().kernels()
    results = run_grid(kernels, (torch.float16, torch.bfloat16, torch.float32))
    bad = [f"{r.case} [{r.dtype}]: {r.detail}" for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    called = {name for name, _ in fake_npu.calls}
    assert {"npu_fusion_attention", "npu_rms_norm", "npu_rotary_mul", "npu_swiglu",
            "npu_weight_quant_batchmatmul", "npu_convert_weight_to_int4pack"} <= called
    modes = {kw["mode"] for name, kw in fake_npu.calls if name == "npu_rotary_mul"}
    assert modes == {"half", "interleave"}
    sparse = {kw["sparse_mode"] for name, kw in fake_npu.calls if name == "npu_fusion_attention"}
    assert sparse == {0, 5}, "prefix masks must use the prefix sparse mode, others the explicit mask"
    # fused attention and weight-quant matmul are declared for fp16/bf16 only: fp32 falls back, loudly
    assert not kernels["attention"].supports(torch.float32)


def test_int4_pack_is_made_once_per_weight(fake_npu):
    from glm_runtime.backends.npu import kernels as K
    from glm_runtime.core.quant import quantize

    qw, sc = quantize(torch.randn(24, 32), 4)
    x = torch.randn(3, 32).half()
    y1 = K.quantized_linear(x, qw, sc, None, 4)
    y2 = K.quantized_linear(x, qw, sc, None, 4)
    assert torch.equal(y1, y2)
    assert [n for n, _ in fake_npu.calls].count("npu_convert_weight_to_int4pack") == 1


def test_prefix_detection_matches_glm_masks():
    from glm_runtime.backends.npu.kernels import prefix_lengths
    from glm_runtime.core.masks import prefill_inputs
    from glm_runtime.core.presets import preset

    c = preset("tiny-glm-130b")
    body = [5, 6, 7, c.gmask_token_id, c.sop_token_id, 9, 10]
    ids = torch.tensor([body, body])
    _, mask, _ = prefill_inputs(c, ids, None)
    assert prefix_lengths(mask) == [4, 4]  # bidirectional context: the tokens before <sop>
    am = torch.ones_like(ids)
    am[1, :2] = 0
    _, padded, _ = prefill_inputs(c, ids, am)
    assert prefix_lengths(padded) is None  # left padding is not the prefix pattern: explicit mask


def test_model_runs_through_the_fake_npu(fake_npu):
    from glm_runtime.backends.npu.plugin import NPUBackend

    b = NPUBackend()
    target = Target(b, b.kernels(), torch.device("cpu"), (torch.float16,), host=True)
    for family, bits in (("tiny-glm-130b", None), ("tiny-chatglm2", 4)):
        r = compare(target, family, torch.float16, bits, strict=True, new_tokens=3)
        assert r.ok, r.detail


def test_probe_explains_each_state(monkeypatch):
    from glm_runtime.backends.npu import plugin

    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(plugin.importlib.util, "find_spec", lambda name: None)
    p = plugin.NPUBackend().probe()
    assert not p.available and "torch_npu is not installed" in p.reason

    monkeypatch.setattr(plugin.importlib.util, "find_spec", lambda name: importlib.machinery.ModuleSpec(name, None))

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch_npu":
                raise OSError("libhccl.so: cannot open shared object file: No such file or directory")
            return None

    monkeypatch.setattr(sys, "meta_path", [Broken()] + sys.meta_path)
    p = plugin.NPUBackend().probe()
    assert not p.available
    assert "torch_npu import failed with OSError: libhccl.so" in p.reason
    assert "CANN" in p.reason and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in p.reason

    monkeypatch.setattr(sys, "meta_path", sys.meta_path[1:])
    monkeypatch.setitem(sys.modules, "torch_npu", FakeTorchNpu(devices=0))
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    p = plugin.NPUBackend().probe()
    assert not p.available and "sees no NPU" in p.reason and "ASCEND_RT_VISIBLE_DEVICES=''" in p.reason

    monkeypatch.setitem(sys.modules, "torch_npu", FakeTorchNpu(devices=8))
    p = plugin.NPUBackend().probe()
    assert p.available and p.devices[-1] == "npu:7" and "8 NPU(s)" in p.reason
    assert plugin.NPUBackend.dist_backend == "hccl" and plugin.NPUBackend.device_type == "npu"
