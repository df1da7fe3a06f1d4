"""The onnx backend against the PyTorch cpu backend, for every GLM family.

Each tiny preset keeps its family's real vocabulary and special-token ids (blank
infilling needs them) and gets random weights drawn wider than the usual init
(:func:`wide_state`), so that logits spread over several units and attention is far
from uniform: a tolerance of 1e-4 on logits of that scale is a relative error of ~1e-5,
where fp32 reordering gives a few 1e-7 and any lowering mistake gives 1e-2 or more.

Every family is exported once per module, through ``glmrt export-onnx`` in
subprocesses that run side by side (export is the slow part: ~8 s of one core each),
together with the ``--quantize int8`` export the int8 test inspects.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from glm_runtime import load_model, preset
from glm_runtime.api import GLM
from glm_runtime.converters import native
from glm_runtime.converters.onnx import cached_attention, layout, stacked_decode
from glm_runtime.converters.onnx.export import export, export_model
from glm_runtime.converters.quantize import quantize_scheme
from glm_runtime.core.build import build_model, random_state
from glm_runtime.core.errors import BackendError, CheckpointError, GLMError
from glm_runtime.core.generation import full_inputs
from glm_runtime.core.masks import decode_inputs, prefill_inputs
from glm_runtime.core.model import parameter_shapes
from glm_runtime.core.quant import LINEARS as QUANT_LINEARS
from glm_runtime.core.registry import get_backend

FAMILIES = ["tiny-glm-130b", "tiny-chatglm-6b", "tiny-chatglm2", "tiny-glm-4", "tiny-glm-4-0414",
            "tiny-chatglm2+hd32", "tiny-glm-4+hd32", "tiny-glm-4-0414+hd32g3"]
HD32 = "+hd32"


def family_config(name):
    """A preset, or ``preset+hd32``: that preset with 32-wide heads. The causal families
    export their attention as GroupQueryAttention, whose rotary needs a head size that is
    a multiple of 16 (released GLMs have 128); the tiny presets' 24 takes the standard
    Attention path instead, so each causal family is exported both ways. ``+hd32g3``
    also has three query heads per KV head, not the presets' two, so that the stacked
    decode branch's reshapes (KV heads x group) cannot pass with the two swapped."""
    base, _, variant = name.partition("+")
    if not variant:
        return preset(base)
    cfg = preset(base, head_dim=32)
    return preset(base, head_dim=32, num_heads=3 * cfg.num_kv_heads) if variant.endswith("g3") else cfg
ATOL = 1e-4


def wide_state(cfg, seed=0):
    """Norm gains 1 + N(0, 0.1), embeddings N(0, 0.05), every other tensor N(0, 0.2). The
    layers must outweigh the embedding: with GLM-130B's tied embedding and DeepNorm
    residual a weaker stack makes greedy decoding repeat the last token forever."""
    g = torch.Generator().manual_seed(seed)
    st = random_state(cfg, seed)
    for k, v in st.items():
        if k.endswith("norm.weight"):
            st[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            std = 0.05 if k.startswith(("embed.", "lm_head.")) else 0.2
            st[k] = std * torch.randn(v.shape, generator=g)
    return st


INT8 = "tiny-chatglm2"
ENV = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")


class Pair:
    """A family's native checkpoint on the cpu backend and its export on the onnx backend."""

    def __init__(self, root, name):
        self.cfg = family_config(name)
        self.native_dir, self.onnx_dir, self.int8_dir = root / "native", root / "onnx", root / "int8"
        self.cpu = load_model(self.native_dir, backend="cpu")
        self.onnx = load_model(self.onnx_dir, backend="onnx")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(family, int8?): (root directory, CLI stdout)} for every export, made in parallel."""
    root = tmp_path_factory.mktemp("onnx")
    jobs = {}
    for name in FAMILIES:
        cfg = family_config(name)
        native.save(root / name / "native", cfg, wide_state(cfg))
        for int8 in (False, True) if name == INT8 else (False,):
            out = root / name / ("int8" if int8 else "onnx")
            cmd = [sys.executable, "-m", "glm_runtime.cli.main", "export-onnx", str(root / name / "native"), str(out)]
            jobs[name, int8] = subprocess.Popen(cmd + ["--quantize", "int8"] * int8, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True, env=ENV)
    done = {}
    for key, p in jobs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"export of {key} failed: {err[-2000:]}"
        done[key] = (root / key[0], out)
    return done


@pytest.fixture(scope="module")
def pairs(exports):
    made = {}

    def get(name) -> Pair:
        if name not in made:
            made[name] = Pair(exports[name, False][0], name)
        return made[name]
    return get


def infill_batch(cfg):
    """Left-padded batch of blank-infilling prompts: text [MASK] text [gMASK] <sop>
    (row 0 full length, row 1 with 3 pads, row 2 without <sop>)."""
    pad = cfg.pad_token_id or 0
    rows = [[11, 12, 13, cfg.mask_token_id, 14, 15, cfg.gmask_token_id, cfg.sop_token_id],
            [21, cfg.mask_token_id, 22, cfg.gmask_token_id, cfg.sop_token_id],
            [31, 32, 33, 34, cfg.gmask_token_id, 35]]
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_logits_match_cpu(pairs, name):
    p = pairs(name)
    ids, am = infill_batch(p.cfg)
    ref, got = p.cpu(ids, am), p.onnx(ids, am)
    real = am.bool()
    assert ref[real].abs().max() > 0.5  # the tolerance below is meaningful at this scale
    assert (got - ref)[real].abs().max() <= ATOL
    assert float(layout.read_export(p.onnx_dir).meta["export_max_abs_error_vs_torch"]) <= ATOL


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_with_past_match_cpu(pairs, name):
    """Prefill into a cache, 3 single-token steps, then a 3-token chunk, all with past."""
    p = pairs(name)
    ids, am = infill_batch(p.cfg)
    B, T = ids.shape
    steps = torch.tensor([[41, 42, 43, 44, 45, 46]] * B) + torch.arange(B)[:, None]

    def run(model):
        outs = []
        cache = model.new_cache(B, T + 6)
        pos, mask, state = prefill_inputs(p.cfg, ids, am)
        with torch.inference_mode():
            outs.append(model(ids, pos, mask, cache=cache, start=0)[am.bool()])
            for i in range(3):
                pos, mask = decode_inputs(state)
                outs.append(model(steps[:, i:i + 1], pos, mask, cache=cache, start=T + i))
            pos, mask = full_inputs(p.cfg, ids, am, 6)
            outs.append(model(steps[:, 3:], pos[..., T + 3:], mask[:, :, T + 3:], cache=cache, start=T + 3))
        return outs

    for ref, got in zip(run(p.cpu.model), run(p.onnx.model)):
        assert (got - ref).abs().max() <= ATOL


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_identical(pairs, name):
    p = pairs(name)
    ids, am = infill_batch(p.cfg)
    ref = p.cpu.generate(ids, am, max_new_tokens=32, stop_token_ids=[])
    got = p.onnx.generate(ids, am, max_new_tokens=32, stop_token_ids=[])
    assert ref.shape == (ids.shape[0], ids.shape[1] + 32)
    assert torch.equal(got, ref)
    assert min(len(set(r)) for r in ref[:, ids.shape[1]:].tolist()) > 8  # not a degenerate repeat


@pytest.mark.parametrize("name", ["tiny-glm-130b", "tiny-glm-4+hd32"])
def test_unpadded_batch_generation_identical(pairs, name):
    """Rows of one length: no mask reaches the runner, whose decode steps then bind views
    of one array of ones (several rows, a new width each step) instead of a mask."""
    p = pairs(name)
    ids = infill_batch(p.cfg)[0][:1].repeat(2, 1)
    ids[1, :3] = torch.tensor([41, 42, 43])
    ref = p.cpu.generate(ids, max_new_tokens=12, stop_token_ids=[])
    got = p.onnx.generate(ids, max_new_tokens=12, stop_token_ids=[])
    assert torch.equal(got, ref)
    assert not torch.equal(ref[0], ref[1])


def test_uncached_generation_matches_cached(pairs):
    p = pairs("tiny-chatglm-6b")
    ids, am = infill_batch(p.cfg)
    a = p.onnx.generate(ids, am, max_new_tokens=6, stop_token_ids=[])
    b = p.onnx.generate(ids, am, max_new_tokens=6, stop_token_ids=[], use_cache=False)
    assert torch.equal(a, b)


def test_export_metadata_and_op_report(pairs):
    p = pairs("tiny-chatglm-6b")
    info = layout.read_export(p.onnx_dir)
    assert info.config == p.cfg and info.precision == "fp32" and info.opset >= 17
    assert json.loads(info.meta["special_tokens"])["sop_token_id"] == p.cfg.sop_token_id
    assert (p.onnx_dir / layout.DATA).stat().st_size > 4 * p.cfg.vocab_size * p.cfg.hidden_size
    rep = p.onnx.op_report()
    assert "providers in session: CPUExecutionProvider" in rep
    assert "CPUExecutionProvider:" in rep and "MatMul" in rep


def _op_types(onnx_dir):
    import onnx

    return {n.op_type for n in layout.nodes(onnx.load(str(onnx_dir / layout.GRAPH), load_external_data=False).graph)}


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_operators(pairs, name):
    """Causal families with heads a multiple of 16 wide: rotary, attention and the cache
    as GroupQueryAttention (no Concat of caches, in-place metadata); the others keep
    Attention; every family's residual adds are fused into its norms."""
    p = pairs(name)
    ops, meta = _op_types(p.onnx_dir), layout.read_export(p.onnx_dir).meta
    fused = p.cfg.attention == "causal" and p.cfg.head_dim % 16 == 0
    assert fused == (HD32 in name)
    assert ("GroupQueryAttention" in ops) == fused and ("Attention" in ops) != fused
    assert (meta.get(layout.KV_CACHE) == layout.KV_IN_PLACE) == fused
    assert not ops & {"Concat", "RotaryEmbedding"} if fused else True
    assert ops & {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}


@pytest.mark.parametrize("name", [f for f in FAMILIES if HD32 in f])
def test_fused_attention_module_computes_the_models_attention(name):
    """The module the export traces in place of each layer's attention, run eagerly (its
    marker op's PyTorch definition), gives the model's own logits on a left-padded batch."""
    cfg = family_config(name)
    model = export_model(cfg, random_state(cfg, 0), 23)
    ids, am = infill_batch(cfg)
    pos, mask, _ = prefill_inputs(cfg, ids, am)
    with torch.inference_mode():
        ref = model(ids, pos, mask, cache=layout.ConcatCache(layout.empty_past(cfg, ids.shape[0])))
        with cached_attention.swapped(model):
            cache = cached_attention.CachedAttentionCache(layout.empty_past(cfg, ids.shape[0]), mask, pos,
                                                          model.rotary.inv_freq)
            got = model(ids, pos, mask, cache=cache)
    assert (got - ref)[am.bool()].abs().max() <= 1e-5  # the same reference ops, composed differently


def test_stacked_decode_branch(pairs):
    """A graph with grouped KV heads gets the stacked decode branch (converters/onnx/
    stacked_decode.py): one attention head per KV head there, G - 1 positions of cache
    slack in its metadata, taken by decode steps from STACK_FROM positions on. A left-padded
    batch decoding across that length (full branch, then stacked, the slack rows past each
    step written and then overwritten) up to the cache's last position gives the cpu
    backend's logits, and a step beyond is an error."""
    import onnx

    p = pairs("tiny-glm-4-0414+hd32g3")
    G = p.cfg.num_heads // p.cfg.num_kv_heads
    assert G == 3 and p.cfg.num_kv_heads == 2
    assert layout.read_export(p.onnx_dir).meta[layout.KV_SLACK] == str(G - 1)
    proto = onnx.load(str(p.onnx_dir / layout.GRAPH), load_external_data=False)
    branch = proto.graph.node[-1]
    graphs = {a.name: a.g for a in branch.attribute}
    assert branch.op_type == "If" and set(graphs) == {"then_branch", "else_branch"}
    heads = {name: {a.i for n in g.node if n.op_type == "GroupQueryAttention" for a in n.attribute
                    if a.name == "num_heads"} for name, g in graphs.items()}
    assert heads == {"then_branch": {p.cfg.num_kv_heads}, "else_branch": {p.cfg.num_heads}}
    (start,) = [int(t.int64_data[0]) for t in proto.graph.initializer if t.name == stacked_decode.THRESHOLD]
    assert start == stacked_decode.STACK_FROM
    B, T, steps = 2, start - 3, 6  # widths start - 2 .. start + 3
    ids = torch.randint(10, 60, (B, T), generator=torch.Generator().manual_seed(0))
    am = torch.ones(B, T, dtype=torch.long)
    ids[1, :3], am[1, :3] = p.cfg.pad_token_id or 0, 0

    def run(model):
        cache = model.new_cache(B, T + steps)
        pos, mask, state = prefill_inputs(p.cfg, ids, am)
        with torch.inference_mode():
            outs = [model(ids, pos, mask, cache=cache)[am.bool()]]
            for i in range(steps):
                pos, mask = decode_inputs(state)
                outs.append(model(torch.full((B, 1), 40 + i), pos, mask, cache=cache, start=T + i))
        return outs, cache

    (ref, _), (got, cache) = run(p.cpu.model), run(p.onnx.model)
    for r, g in zip(ref, got):
        assert (g - r).abs().max() <= ATOL
    with pytest.raises(BackendError, match="full"):
        p.onnx.model(torch.full((B, 1), 1), torch.full((B, 1), T + steps), torch.ones(B, 1, 1, T + steps + 1,
                     dtype=torch.bool), cache=cache, start=T + steps)


# ------------------------------------------------------------------ bad input
def _copy(src, dst):
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _set_meta(graph, **changes):
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    meta = {m.key: m.value for m in proto.metadata_props}
    meta.update(changes)
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    os.unlink(graph)  # hard-linked: replace, do not write through
    onnx.save(proto, str(graph))


def test_wrong_family_metadata(pairs, tmp_path):
    d = _copy(pairs("tiny-chatglm2").onnx_dir, tmp_path / "x")
    _set_meta(d / layout.GRAPH, family="glm-130b")
    with pytest.raises(CheckpointError, match="metadata family 'glm-130b' does not match"):
        load_model(d, backend="onnx")


def test_config_of_another_family(pairs, tmp_path):
    """A 2D-RoPE config on a 1D-position graph: caught from the graph's inputs."""
    d = _copy(pairs("tiny-chatglm2").onnx_dir, tmp_path / "x")
    other = preset("tiny-chatglm-6b")
    _set_meta(d / layout.GRAPH, family=other.family, config=json.dumps(other.to_dict()))
    with pytest.raises(CheckpointError, match="position_ids has rank 2, the config .* needs rank 3"):
        load_model(d, backend="onnx")


def test_missing_and_truncated_external_data(pairs, tmp_path):
    d = _copy(pairs("tiny-chatglm2").onnx_dir, tmp_path / "x")
    data = d / layout.DATA
    os.unlink(data)
    with pytest.raises(CheckpointError, match="external data file model.onnx.data is missing"):
        load_model(d, backend="onnx")
    data.write_bytes(b"\0" * 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(d, backend="onnx")


def test_a_checkpoint_runs_through_a_cached_export(pairs, tmp_path, monkeypatch):
    """Given a checkpoint instead of an export, the onnx backend exports it once into the
    cache (keyed by the files' content) and runs it; a changed weight file gets a new one."""
    from glm_runtime.backends.onnx import cache

    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path / "cache"))
    p = pairs("tiny-chatglm2")
    src = _copy(p.native_dir, tmp_path / "native")
    ids, am = infill_batch(p.cfg)
    m = load_model(src, backend="onnx")
    assert torch.equal(m.generate(ids, am, max_new_tokens=8), p.onnx.generate(ids, am, max_new_tokens=8))
    (entry,) = [d for d in cache.cache_root().iterdir() if d.is_dir()]
    mtime = (entry / layout.GRAPH).stat().st_mtime_ns
    load_model(src, backend="onnx")  # found, not exported again
    assert (entry / layout.GRAPH).stat().st_mtime_ns == mtime
    cfg, st = native.load(src)
    st["final_norm.weight"] = st["final_norm.weight"] * 2
    native.save(src, cfg, st, overwrite=True)
    load_model(src, backend="onnx")
    assert len([d for d in cache.cache_root().iterdir() if d.is_dir()]) == 2
    assert cache.clear() == 2 and not cache.cache_root().exists()


def test_corrupt_graph(pairs, tmp_path):
    p = pairs("tiny-chatglm2")
    d = _copy(p.onnx_dir, tmp_path / "x")
    os.unlink(d / layout.GRAPH)
    (d / layout.GRAPH).write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_model(d, backend="onnx")


def test_cli_error_is_one_line(pairs, tmp_path):
    d = _copy(pairs("tiny-chatglm2").onnx_dir, tmp_path / "x")
    os.unlink(d / layout.DATA)
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    r = subprocess.run([sys.executable, "-m", "glm_runtime.cli.main", "generate", str(d), "--backend", "onnx",
                        "--ids", "5,6,7"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("WARNING")]
    assert len(lines) == 1 and "external data file model.onnx.data is missing" in lines[0], r.stderr


def test_provider_policy(pairs, caplog):
    """Unavailable providers: error in strict mode, loud warning otherwise. A provider that
    runs none of the nodes (onnxruntime's Azure EP) exercises the CPU-fallback rules."""
    d = pairs("tiny-chatglm2").onnx_dir
    with pytest.raises(BackendError, match="has no CUDAExecutionProvider"):
        load_model(d, backend="onnx", providers=["cuda", "cpu"], strict_ops=True)
    with caplog.at_level("WARNING"):
        m = load_model(d, backend="onnx", providers="cuda,cpu", strict_ops=False)
    assert "has no CUDAExecutionProvider" in caplog.text
    assert "providers in session: CPUExecutionProvider" in m.op_report()
    with pytest.raises(BackendError, match="CPU fallback is disabled"):
        load_model(d, backend="onnx", providers=["azure"], strict_ops=True)
    caplog.clear()
    with caplog.at_level("WARNING"):
        m = load_model(d, backend="onnx", providers=["azure"], strict_ops=False)
    assert "graph nodes fell back from AzureExecutionProvider to CPUExecutionProvider" in caplog.text
    assert "CPU fallback: allowed" in m.op_report()


def test_failed_export_writes_nothing(tmp_path, monkeypatch):
    """A failure after files were written (here: in the graph stage) leaves no output."""
    from glm_runtime.converters.onnx import export as ex

    def broken(model, path, opset):
        path.write_bytes(b"partial")
        raise GLMError("simulated exporter failure")

    monkeypatch.setattr(ex, "export_graph", broken)
    cfg = preset("tiny-glm-4")
    with pytest.raises(GLMError, match="simulated"):
        export(cfg, random_state(cfg), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- CLI + int8
def test_cli_int8_export(pairs, exports):
    """``glmrt export-onnx --quantize int8``: the layers' linears and the output projection
    are quantized (glmrt quantize's default scheme) and run as onnxruntime's MatMulNBits
    with int8 activations; the error against the unquantized model is reported, and the
    graph agrees with the cpu backend running the same INT8 checkpoint.

    Bounds: measured on this model (weights std 0.2, so perturbations grow through the
    layers) the mean |difference| against fp32 is 0.3% of max |logit|, the max 2.5%; the
    bounds below leave ~3x margin. A broken lowering (wrong nibble order, scale, zero
    point) is off by the order of the logits themselves: the export's own check compares
    the lowered graph with PyTorch's quantized model at fp32 activations within 1e-4.
    """
    import onnx

    from glm_runtime.cli.main import main

    p = pairs(INT8)
    out, text = p.int8_dir, exports[INT8, True][1]
    assert "int8 vs fp32" in text
    info = layout.read_export(out)
    assert info.precision == "int8" and info.config.quantization_bits == 8
    err = json.loads(info.meta["quantized_error_vs_fp32"])
    assert 0 < err["mean_abs"] < 0.01 * err["max_abs_logit"]
    assert err["max_rel"] < 0.08 and err["top1_agreement"] >= 0.75
    nodes = list(layout.nodes(onnx.load(str(out / layout.GRAPH), load_external_data=False).graph))
    low = [n for n in nodes if n.op_type == "MatMulNBits"]
    stacked = cached_attention.applies(p.cfg, info.opset) and p.cfg.num_heads > p.cfg.num_kv_heads
    branches = 2 if stacked else 1  # the stacked decode branch is a second copy of the layers
    assert len(low) == branches * (4 * p.cfg.num_layers + 1) and all(n.domain == "com.microsoft" for n in low)
    assert not any(n.domain == "glm" for n in nodes)
    fp32_bytes = (p.onnx_dir / layout.DATA).stat().st_size
    quantized_bytes = 4 * sum(math.prod(shape) for k, (shape, _) in parameter_shapes(p.cfg).items()
                              if k == "lm_head.weight" or (k.endswith(".weight") and
                                                           any(f".{m}." in k for m in QUANT_LINEARS)))
    # the quantized matrices shrink to a quarter (plus their scales)
    assert (out / layout.DATA).stat().st_size < fp32_bytes - 0.7 * quantized_bytes
    m = load_model(out, backend="onnx")
    ids, am = infill_batch(p.cfg)
    cpu_int8 = build_model(*quantize_scheme(p.cfg, native.load(p.native_dir)[1], 8), get_backend("cpu"))
    ref = GLM(cpu_int8, get_backend("cpu"))(ids, am)[am.bool()]
    got = m(ids, am)[am.bool()]
    # int8 activations (per block) against bf16 ones: measured 5.5% of the largest logit on
    # this model, whose wide layers amplify every perturbation; a wrong lowering is O(1)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert main(["export-onnx", str(p.native_dir), str(out)]) == 2  # exists, no --force
