"""The exported ONNX directory: file names, graph inputs/outputs, metadata, and the checks
that turn a bad directory into one clear error before onnxruntime sees it.

An export is a directory::

    model.onnx          the graph (opset >= 17) with metadata_props (below)
    model.onnx.data     its weights as external data (ONNX protobufs stop at 2 GiB)
    tokenizer.model     copied from the source checkpoint when it has one

One graph serves prefill and decode. Inputs (``B`` batch, ``T`` new tokens, ``P`` cached
positions; ``P = 0`` for a prefill)::

    input_ids        int64 [B, T]
    position_ids     int64 [B, T], or [B, 2, T] for 2D RoPE (ChatGLM-6B)
    attention_mask   bool  [B, 1, T, P + T]   True = may attend (built by glm_runtime.core.masks)
    logits_index     int64 [K]   the positions (of the T) whose logits are computed
    past_key.{i}     float [B, kv_heads, P, head_dim]   for each layer i
    past_value.{i}   float [B, kv_heads, P, head_dim]

Outputs: ``logits`` float [B, K, vocab] and ``present_key.{i}`` / ``present_value.{i}``
[B, kv_heads, P + T, head_dim] (the past with the new positions appended), the
convention of transformers' ONNX exports.

A graph whose metadata says ``kv_cache: in_place`` (the causal families' attention as
one onnxruntime operator, :mod:`.cached_attention`) also runs with one buffer per layer
bound as both ``past_key.{i}`` and ``present_key.{i}`` (values alike): [B, kv_heads,
capacity, head_dim], its first ``P`` positions valid, ``P + T`` given by the mask's
width; the step writes its positions into the buffer and the presents *are* the buffer.

Masks and positions are inputs, not computed in the graph, so every family's
blank-infilling rules stay in one place (the host code).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError

FORMAT_TAG = "glm-runtime-onnx/1"
GRAPH = "model.onnx"
DATA = "model.onnx.data"
TOKENIZER = "tokenizer.model"
MIN_OPSET = 17
# What the exporter writes, beyond this contract: bumped when the graph changes (2: the
# causal families' attention as GroupQueryAttention, residual adds fused into the norms;
# 3: a decode branch with the query heads stacked, .stacked_decode), so that exports
# cached under an unchanged package version are made again.
GRAPH_REVISION = 3
KV_CACHE, KV_IN_PLACE = "kv_cache", "in_place"  # metadata: the layers' past and present may share a buffer
KV_SLACK = "kv_slack"  # metadata: positions an in-place cache buffer needs beyond the longest sequence
SPECIAL_TOKENS = ("pad_token_id", "eos_token_ids", "mask_token_id", "gmask_token_id", "smask_token_id",
                  "sop_token_id", "eop_token_id")


def past_names(config: GLMConfig) -> list[str]:
    return [f"past_{kv}.{i}" for i in range(config.num_layers) for kv in ("key", "value")]


def present_names(config: GLMConfig) -> list[str]:
    """The cache outputs, in the order of :func:`past_names` (the i-th present is the next
    step's i-th past, and the same buffer when the cache is written in place)."""
    return [f"present_{kv}.{i}" for i in range(config.num_layers) for kv in ("key", "value")]


def input_names(config: GLMConfig) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask", "logits_index"] + past_names(config)


def output_names(config: GLMConfig) -> list[str]:
    return ["logits"] + present_names(config)


# the graph's dtype of each step input (the past and present are fp32)
INPUT_DTYPES = {"input_ids": np.int64, "position_ids": np.int64, "attention_mask": np.bool_, "logits_index": np.int64}


def feeds(config: GLMConfig, input_ids, position_ids, attention_mask, past, logits_index=None) -> dict:
    """The session's input dict from torch tensors (or arrays); ``past`` is one (key,
    value) pair per layer; ``logits_index`` defaults to every position. onnxruntime needs
    contiguous arrays of exactly the graph's dtypes."""

    def arr(t, dtype):
        return np.ascontiguousarray(t.numpy() if hasattr(t, "numpy") else t, dtype=dtype)

    index = np.arange(input_ids.shape[1]) if logits_index is None else logits_index
    out = {name: arr(t, INPUT_DTYPES[name]) for name, t in (("input_ids", input_ids), ("position_ids", position_ids),
                                                            ("attention_mask", attention_mask), ("logits_index", index))}
    for i, (k, v) in enumerate(past):
        out[f"past_key.{i}"] = arr(k, np.float32)
        out[f"past_value.{i}"] = arr(v, np.float32)
    return out


def empty_past(config: GLMConfig, batch: int, length: int = 0, seed: int | None = None) -> tuple:
    """One (key, value) pair per layer of ``length`` cached positions: zeros (a prefill's
    empty past), or normal noise when ``seed`` is given (an example input for tracing)."""
    shape = (batch, config.num_kv_heads, length, config.head_dim)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    make = (lambda: torch.zeros(shape)) if g is None else (lambda: torch.randn(shape, generator=g))
    return tuple((make(), make()) for _ in range(config.num_layers))


class ConcatCache:
    """The model's cache interface (``update(layer, k, v, start)``) as pure dataflow:
    returns past + new and records it as the layer's present, so the trace has the cache
    as graph inputs and outputs."""

    def __init__(self, past: tuple):
        self.past = past
        self.present: list = [None] * len(past)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, kv_len: int):
        pk, pv = self.past[layer]
        k, v = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
        self.present[layer] = (k, v)
        return k, v


def metadata(config: GLMConfig, precision: str, extra: dict | None = None) -> dict[str, str]:
    """The metadata_props an export carries (all values are strings, as ONNX requires)."""
    out = {
        "format": FORMAT_TAG,
        "family": config.family,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "special_tokens": json.dumps({k: getattr(config, k) for k in SPECIAL_TOKENS}, sort_keys=True),
        "precision": precision,
    }
    for k, v in (extra or {}).items():
        out[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


@dataclass
class ExportInfo:
    """A checked export directory, ready for an onnxruntime session."""

    path: Path
    config: GLMConfig
    precision: str
    opset: int
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def graph(self) -> Path:
        return self.path / GRAPH

    @property
    def tokenizer(self) -> Path | None:
        t = self.path / TOKENIZER
        return t if t.is_file() else None


def is_onnx_export(path: str | os.PathLike) -> bool:
    return (Path(path) / GRAPH).is_file()


def read_export(path: str | os.PathLike) -> ExportInfo:
    """Check an export directory and return what it holds, or raise a one-line
    CheckpointError naming the file and the problem (never an onnxruntime trace)."""
    import onnx

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("an ONNX export is a directory written by 'glmrt export-onnx'; "
                              + ("no such directory" if not path.exists() else "this is a file"), path)
    graph = path / GRAPH
    if not graph.is_file():
        raise CheckpointError(f"not an ONNX export: no {GRAPH} (write one with 'glmrt export-onnx MODEL OUT')",
                              path)
    try:
        proto = onnx.load(str(graph), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a corrupt file
        raise CheckpointError(f"not a readable ONNX model ({type(e).__name__})", graph) from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != FORMAT_TAG:
        raise CheckpointError(f"metadata 'format' is {meta.get('format')!r}, expected {FORMAT_TAG!r} "
                              "(not exported by glm-runtime, or by an incompatible version)", graph)
    try:
        cfg_dict = json.loads(meta["config"])
    except KeyError:
        raise CheckpointError("metadata has no 'config'", graph) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"metadata 'config' is not valid JSON ({e})", graph) from None
    config = GLMConfig.from_dict(cfg_dict, source=f"{graph} (metadata 'config')")
    if meta.get("family") != config.family:
        raise CheckpointError(f"metadata family {meta.get('family')!r} does not match the family of its config "
                              f"({config.family!r})", graph)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise CheckpointError(f"opset {opset} is older than the {MIN_OPSET} this runtime needs", graph)
    _check_signature(proto, config, graph)
    _check_external_data(proto, path, graph)
    return ExportInfo(path, config, meta.get("precision", "fp32"), opset, meta)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_signature(proto, config: GLMConfig, graph: Path) -> None:
    """Graph inputs/outputs must be the ones ``config`` implies (names, ranks, static sizes)."""
    inputs = {v.name: _dims(v) for v in proto.graph.input}
    outputs = {v.name: _dims(v) for v in proto.graph.output}
    want_in, want_out = input_names(config), output_names(config)
    if sorted(inputs) != sorted(want_in):
        missing, extra = sorted(set(want_in) - set(inputs)), sorted(set(inputs) - set(want_in))
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"graph inputs do not match its {config.family} config "
                              f"({config.num_layers} layers): {what}", graph)
    if sorted(outputs) != sorted(want_out):
        raise CheckpointError(f"graph outputs do not match its config (expected {', '.join(want_out[:3])}, ...)",
                              graph)
    pos_rank = 3 if config.rope == "neox_2d" else 2
    if len(inputs["position_ids"]) != pos_rank:
        raise CheckpointError(f"graph input position_ids has rank {len(inputs['position_ids'])}, the config "
                              f"(rope {config.rope}) needs rank {pos_rank}", graph)
    kv = inputs["past_key.0"]
    if len(kv) != 4 or kv[1] != config.num_kv_heads or kv[3] != config.head_dim:
        raise CheckpointError(f"graph input past_key.0 has shape {kv}, the config needs "
                              f"[batch, {config.num_kv_heads}, past, {config.head_dim}]", graph)
    if outputs["logits"][-1:] != [config.vocab_size]:
        raise CheckpointError(f"graph output logits has shape {outputs['logits']}, the config's vocabulary "
                              f"is {config.vocab_size}", graph)


def graphs(graph):
    """``graph`` and every subgraph its nodes hold (an ``If``'s branches), recursively."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from graphs(g)


def nodes(graph):
    """Every node of ``graph`` and of its subgraphs."""
    for g in graphs(graph):
        yield from g.node


def attrs(node) -> dict:
    """A node's attributes as {name: Python value}."""
    from onnx import helper  # heavy: imported where used (a plain glmrt command never loads it)

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def tensors(proto):
    """Every tensor stored in the graph: initializers and node attributes, subgraphs' too."""
    for g in graphs(proto.graph):
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors


def _check_external_data(proto, directory: Path, graph: Path) -> None:
    """Every externally stored tensor's file must exist and be long enough."""
    from onnx import TensorProto

    need: dict[str, int] = {}
    for t in tensors(proto):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise CheckpointError(f"tensor {t.name} has an invalid external data location {loc!r}", graph)
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        need[loc] = max(need.get(loc, 0), end)
    for loc, end in sorted(need.items()):
        f = directory / loc
        if not f.is_file():
            raise CheckpointError(f"external data file {loc} is missing (the graph's weights live there)", f)
        if f.stat().st_size < end:
            raise CheckpointError(f"external data file is truncated: {f.stat().st_size} bytes, the graph "
                                  f"needs {end}", f)
