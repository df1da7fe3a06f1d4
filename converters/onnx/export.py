"""Export a GLM checkpoint to ONNX (layout in :mod:`converters.onnx.layout`).

The graph is traced from :class:`glm_core.model.GLMModel` itself, built on the op
contract's *reference* ops (plain PyTorch, fp32): those are the definition of every op,
and they lower to standard ONNX operators (MatMul, Softmax, Where ...) that any
execution provider runs. The KV cache is made explicit by handing the model a cache that
concatenates (past + new) instead of writing into preallocated buffers.

Exporter notes (torch 2.13, ``dynamo=True``): torch.export specialises any dimension
whose example size is 1 (and 0), so the example uses batch 2, 3 new tokens and 4 cached
positions, all distinct; the mask's last dimension (past + new) is left to
``Dim.AUTO`` because torch.export cannot declare a sum of two dimensions.

Every export is checked before it is kept: onnxruntime must reproduce the PyTorch
reference's logits within :data:`CHECK_ATOL` on a blank-infilling prompt with a
left-padded row, for the prefill and for a decode step with the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from glm_core.config import GLMConfig
from glm_core.errors import GLMError
from glm_core.masks import decode_inputs, prefill_inputs
from glm_core.model import GLMModel
from glm_core.ops import OpTable

from ..native import atomic_dir
from . import layout

DEFAULT_OPSET = 18
# fp32 logits of the same graph computed by two implementations: reductions are
# reordered (blocked MatMul, fused Softmax), which moves logits of magnitude ~1 by a few
# 1e-7; 1e-4 leaves a wide margin while any real lowering error is orders larger.
CHECK_ATOL = 1e-4


class ConcatCache:
    """The model's cache interface (``update(layer, k, v, start)``) as pure dataflow:
    returns past + new and records it as the layer's present, so the trace has the cache
    as graph inputs and outputs."""

    def __init__(self, past: tuple):
        self.past = past
        self.present: list = [None] * len(past)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        pk, pv = self.past[layer]
        k, v = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
        self.present[layer] = (k, v)
        return k, v


class ExportGraph(torch.nn.Module):
    """(input_ids, position_ids, attention_mask, logits_index, past) -> (logits, presents...).

    The body is :meth:`GLMModel.forward` with one addition: only the positions listed in
    ``logits_index`` reach the final norm and the vocabulary projection (a generation's
    prefill needs the last one only; projecting every prompt position costs T x H x V).
    Every export is compared with ``GLMModel.forward`` itself (:func:`compare_with_torch`),
    so the two cannot drift apart unnoticed.
    """

    def __init__(self, model: GLMModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, logits_index, past):
        m, cache = self.model, ConcatCache(past)
        x = m.ops.embedding(input_ids, m.embed.weight)
        cos, sin = m.rotary(position_ids, x.dtype)
        for layer in m.layers:
            x = layer(x, cos, sin, attention_mask, cache, 0)
        x = m.final_norm(x.index_select(1, logits_index))
        return m.ops.lm_head(x, m.output_weight), tuple(t for kv in cache.present for t in kv)


def reference_model(config: GLMConfig, state: dict[str, torch.Tensor]) -> GLMModel:
    """The graph on reference ops with fp32 weights (int8 weights and their scales kept)."""
    ops = OpTable("reference", {}, torch.float32, strict=False)
    with torch.device("meta"):
        model = GLMModel(config, ops, quant_bits=config.quantization_bits)
    placed = {k: v if (not v.is_floating_point() or k.endswith(".scale")) else v.float() for k, v in state.items()}
    model.load_state_dict(placed, strict=True, assign=True)
    model.rotary = type(model.rotary)(config)  # its buffer was built on meta
    return model.eval().requires_grad_(False)


def empty_past(config: GLMConfig, batch: int, length: int = 0, seed: int | None = None) -> tuple:
    shape = (batch, config.num_kv_heads, length, config.head_dim)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    make = (lambda: torch.zeros(shape)) if g is None else (lambda: torch.randn(shape, generator=g))
    return tuple((make(), make()) for _ in range(config.num_layers))


def _example(config: GLMConfig):
    B, T, P = 2, 3, 4
    ids = torch.arange(T).repeat(B, 1) + 5
    pos = torch.arange(P, P + T).repeat(B, 1)
    if config.rope == "neox_2d":
        pos = torch.stack((pos, torch.arange(1, T + 1).repeat(B, 1)), 1)
    mask = torch.ones(B, 1, T, P + T, dtype=torch.bool)
    return ids, pos, mask, torch.tensor([1, 2]), empty_past(config, B, P, seed=0)


def _dynamic_shapes(config: GLMConfig):
    from torch.export import Dim

    b, s, p = Dim("batch"), Dim("seq"), Dim("past")
    return {
        "input_ids": {0: b, 1: s},
        "position_ids": {0: b, 2: s} if config.rope == "neox_2d" else {0: b, 1: s},
        "attention_mask": {0: b, 2: s, 3: Dim.AUTO},
        "logits_index": {0: Dim("keep")},
        "past": tuple(({0: b, 2: p}, {0: b, 2: p}) for _ in range(config.num_layers)),
    }


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter warns about unrelated optional packages (torchvision) and deprecated
    pytree APIs; keep the user's terminal for the progress bar and real problems."""
    lg = logging.getLogger("torch.onnx")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(level)


def export_graph(model: GLMModel, path: Path, opset: int) -> None:
    """Trace ``model`` and write ``path`` with its weights as external data beside it."""
    config = model.config
    try:
        with _quiet_exporter():
            program = torch.onnx.export(ExportGraph(model).eval(), _example(config), dynamo=True,
                                        dynamic_shapes=_dynamic_shapes(config), opset_version=opset,
                                        input_names=layout.input_names(config),
                                        output_names=layout.output_names(config), optimize=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; name the stage
        raise GLMError(f"torch.onnx.export failed for family {config.family}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
    program.save(str(path), external_data=True)
    if not (path.parent / layout.DATA).is_file():  # the layout promises this name
        raise GLMError(f"the exporter did not write {layout.DATA} beside {path.name}", path.parent)


# ------------------------------------------------------------------ checking
def sample_prompt(config: GLMConfig, seed: int = 0):
    """A 2-row blank-infilling prompt, row 1 left-padded: ids and padding mask [2, 10]."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(10, min(config.vocab_size, 20000), (n,), generator=g)  # noqa: E731
    specials = [t for t in (config.mask_token_id, config.sop_token_id) if t is not None and t < config.vocab_size]
    row = torch.cat((words(3), torch.tensor(specials[:1], dtype=torch.long), words(3),
                     torch.tensor(specials[1:], dtype=torch.long)))
    T = len(row) + 2
    pad = config.pad_token_id or 0
    ids = torch.full((2, T), pad, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    ids[0, :] = torch.cat((words(2), row))
    mask[0] = 1
    ids[1, 2:] = row
    mask[1, 2:] = 1
    return ids, mask


def compare_with_torch(model: GLMModel, run, seed: int = 0) -> float:
    """Max |logits difference| between ``run(ids, pos, mask, past)`` (the graph: numpy
    logits of every position and the presents) and ``GLMModel.forward`` on a prefill and
    one decode step with the cache, real positions only."""
    config = model.config
    ids, pad_mask = sample_prompt(config, seed)
    pos, mask, state = prefill_inputs(config, ids, pad_mask)
    cache = ConcatCache(empty_past(config, ids.shape[0]))
    with torch.inference_mode():
        ref = model(ids, pos, mask, cache=cache)
    got, present = run(ids, pos, mask, cache.past)
    real = pad_mask.bool().numpy()
    err = float(np.abs(got - ref.numpy())[real].max())
    for (k, v), (gk, gv) in zip(cache.present, zip(present[0::2], present[1::2])):
        err = max(err, float(np.abs(gk - k.numpy()).max()), float(np.abs(gv - v.numpy()).max()))
    nxt = ref[:, -1].argmax(-1, keepdim=True)
    pos1, mask1 = decode_inputs(state)
    mask1 = state.real[:, None, None, :] if mask1 is None else mask1
    cache = ConcatCache(tuple(cache.present))
    with torch.inference_mode():
        ref1 = model(nxt, pos1, mask1, cache=cache, start=ids.shape[1])
    got1, _ = run(nxt, pos1, mask1, cache.past)
    return max(err, float(np.abs(got1 - ref1.numpy()).max()))


def cpu_session(graph: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])


def session_runner(session, config: GLMConfig):
    def run(ids, pos, mask, past):
        out = session.run(None, layout.feeds(config, ids, pos, mask, past))
        return out[0], out[1:]
    return run


# ----------------------------------------------------------------- the entry
def export(config: GLMConfig, state: dict[str, torch.Tensor], out: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
           quantize: str | None = None, tokenizer: str | os.PathLike | None = None, overwrite: bool = False,
           progress: bool = True) -> dict:
    """Write the export directory ``out`` atomically; returns a report dict with the
    measured error against PyTorch (and, for ``quantize='int8'``, against fp32)."""
    if opset < layout.MIN_OPSET:
        raise GLMError(f"opset {opset} is too old: the export needs >= {layout.MIN_OPSET}")
    if quantize not in (None, "int8"):
        raise GLMError(f"unknown quantization {quantize!r} (supported: int8)")
    stages = ["build the reference model", "export the graph", "check against PyTorch"]
    if quantize:
        stages += ["quantize to int8", "measure int8 error"]
    stages.append("write metadata")
    report: dict = {"family": config.family, "opset": opset}
    bar = tqdm(total=len(stages), desc="export-onnx", unit="step", disable=not progress)
    step = iter(stages)

    def next_stage():
        bar.set_postfix_str(next(step))

    with atomic_dir(out, overwrite) as tmp, bar:
        tmp = Path(tmp)
        next_stage()
        model = reference_model(config, state)
        bar.update()
        next_stage()
        graph = tmp / layout.GRAPH
        export_graph(model, graph, opset)
        bar.update()
        next_stage()
        session = cpu_session(graph)
        err = compare_with_torch(model, session_runner(session, config))
        if not err <= CHECK_ATOL:
            raise GLMError(f"the exported graph disagrees with PyTorch: max |logits difference| {err:.3g} > "
                           f"{CHECK_ATOL} (an exporter problem; the export was not written)")
        report["max_abs_error_vs_torch"] = err
        bar.update()
        precision = "fp32"
        if quantize:
            from .quantize import int8_error, quantize_int8

            next_stage()
            qdir = tmp / "int8"
            quantize_int8(graph, qdir)
            bar.update()
            next_stage()
            report["int8"] = int8_error(session, cpu_session(qdir / layout.GRAPH), config)
            del session
            for f in (layout.GRAPH, layout.DATA):
                (tmp / f).unlink()
                (qdir / f).rename(tmp / f)
            qdir.rmdir()
            precision = "int8-dynamic"
            bar.update()
        next_stage()
        extra = {"export_max_abs_error_vs_torch": f"{err:.3g}"}
        if "int8" in report:
            extra["int8_error_vs_fp32"] = report["int8"]
        write_metadata(graph, layout.metadata(config, precision, extra))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / layout.TOKENIZER)
        layout.read_export(tmp)  # what the runtime will check, checked now
        bar.update()
    report["precision"] = precision
    report["files"] = {f.name: f.stat().st_size for f in sorted(Path(out).iterdir())}
    return report


def write_metadata(graph: Path, meta: dict[str, str]) -> None:
    """Set metadata_props on the graph file, leaving its external data in place."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    tmp = graph.with_suffix(".onnx.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(graph)


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, **kwargs) -> dict:
    """Read any supported checkpoint directory and export it (see :func:`export`)."""
    from converters.detect import load_checkpoint

    _, config, state, tok = load_checkpoint(src, progress=kwargs.get("progress", True))
    return export(config, state, out, tokenizer=tok, **kwargs)
