"""Export a GLM checkpoint to ONNX (layout in :mod:`glm_runtime.converters.onnx.layout`).

The graph is traced from :meth:`glm_runtime.core.model.GLMModel.forward` itself, on the op
contract's *reference* ops (plain PyTorch, fp32; :func:`~glm_runtime.core.build.reference_model`):
those are the definition of every op, and they lower to standard ONNX operators (MatMul,
Softmax, Where ...) that any execution provider runs. The KV cache is made explicit by
handing the model a cache that concatenates (past + new) instead of writing into
preallocated buffers.

Exporter notes (torch 2.13, ``dynamo=True``): torch.export specialises any dimension
whose example size is 1 (and 0), so the example uses batch 2, 3 new tokens and 4 cached
positions, all distinct; the mask's last dimension (past + new) is left to
``Dim.AUTO`` because torch.export cannot declare a sum of two dimensions.

Every export is checked before it is kept (:mod:`.check`): onnxruntime must reproduce the
PyTorch reference's logits within :data:`~.check.CHECK_ATOL` on a blank-infilling prompt
with a left-padded row, for the prefill and for a decode step with the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch.export import Dim
from tqdm import tqdm

from glm_runtime.core.build import reference_model
from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import GLMError
from glm_runtime.core.model import GLMModel

from ..detect import load_checkpoint
from ..native import atomic_dir
from . import layout
from .check import CHECK_ATOL, compare_with_torch, cpu_session, int8_error, session_runner
from .quantize import quantize_int8

DEFAULT_OPSET = 18


class ExportGraph(torch.nn.Module):
    """(input_ids, position_ids, attention_mask, logits_index, past) -> (logits, presents...).

    :meth:`GLMModel.forward` itself, with a :class:`~.layout.ConcatCache` that makes the KV
    cache graph inputs and outputs, and ``logits_index`` as a graph input (a generation's
    prefill needs the last position's logits only; projecting every prompt position costs
    T x H x V).
    """

    def __init__(self, model: GLMModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, logits_index, past):
        cache = layout.ConcatCache(past)
        logits = self.model(input_ids, position_ids, attention_mask, cache=cache, logits_index=logits_index)
        return logits, tuple(t for kv in cache.present for t in kv)


def _example(config: GLMConfig):
    B, T, P = 2, 3, 4
    ids = torch.arange(T).repeat(B, 1) + 5
    pos = torch.arange(P, P + T).repeat(B, 1)
    if config.rope == "neox_2d":
        pos = torch.stack((pos, torch.arange(1, T + 1).repeat(B, 1)), 1)
    mask = torch.ones(B, 1, T, P + T, dtype=torch.bool)
    return ids, pos, mask, torch.tensor([1, 2]), layout.empty_past(config, B, P, seed=0)


def _dynamic_shapes(config: GLMConfig):
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
    import onnx  # optional dependency (the onnx extra)

    proto = onnx.load(str(graph), load_external_data=False)
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    tmp = graph.with_suffix(".onnx.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(graph)


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, **kwargs) -> dict:
    """Read any supported checkpoint directory and export it (see :func:`export`)."""
    _, config, state, tok = load_checkpoint(src, progress=kwargs.get("progress", True))
    return export(config, state, out, tokenizer=tok, **kwargs)
