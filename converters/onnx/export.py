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

from glm_runtime.core.build import materialize
from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import GLMError
from glm_runtime.core.model import GLMModel

from ..detect import load_checkpoint
from ..native import atomic_dir
from ..quantize import dequantize_state, quantize_scheme
from . import cached_attention, export_ops, fuse, layout, lowbit, stacked_decode
from .check import CHECK_ATOL, compare_with_torch, cpu_session, quantization_error, session_runner

DEFAULT_OPSET = export_ops.FUSED_OPSET


class ExportGraph(torch.nn.Module):
    """(input_ids, position_ids, attention_mask, logits_index, past) -> (logits, presents...).

    :meth:`GLMModel.forward` itself, with a cache that makes the KV cache graph inputs and
    outputs (:class:`~.layout.ConcatCache`, or with ``cached`` the inputs of
    :mod:`.cached_attention`'s operator, whose attention modules the model must then hold),
    and ``logits_index`` as a graph input (a generation's prefill needs the last position's
    logits only; projecting every prompt position costs T x H x V).
    """

    def __init__(self, model: GLMModel, cached: bool):
        super().__init__()
        self.model, self.cached = model, cached

    def forward(self, input_ids, position_ids, attention_mask, logits_index, past):
        cache = (cached_attention.CachedAttentionCache(past, attention_mask, position_ids, self.model.rotary.inv_freq)
                 if self.cached else layout.ConcatCache(past))
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


def export_model(config: GLMConfig, state: dict[str, torch.Tensor], opset: int = DEFAULT_OPSET) -> GLMModel:
    """The graph to trace, on fp32 weights: the op contract's reference ops (the definition
    of every op), with the ops ONNX has as one operator traced as such (:mod:`.export_ops`)."""
    ops = export_ops.op_table(opset, quantized=bool(config.quantization_bits or config.lm_head_bits))
    return materialize(config, state, ops, torch.float32, torch.device("cpu")).eval().requires_grad_(False)


def export_graph(model: GLMModel, path: Path, opset: int) -> int:
    """Trace ``model`` and write ``path`` with its weights as external data beside it;
    quantized linears become ``MatMulNBits`` computing with fp32 activations
    (``accuracy_level`` 0: exact, what the check against PyTorch needs). Returns the
    positions of slack the KV cache buffers need (:mod:`.stacked_decode`; 0: none)."""
    config = model.config
    cached = cached_attention.applies(config, opset)
    try:
        with _quiet_exporter(), (cached_attention.swapped(model) if cached else contextlib.nullcontext()):
            program = torch.onnx.export(ExportGraph(model, cached).eval(), _example(config), dynamo=True,
                                        dynamic_shapes=_dynamic_shapes(config), opset_version=opset,
                                        input_names=layout.input_names(config),
                                        output_names=layout.output_names(config), optimize=True, verbose=False,
                                        custom_translation_table=export_ops.translation_table(opset))
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; name the stage
        raise GLMError(f"torch.onnx.export failed for family {config.family}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
    proto = program.model_proto
    if config.quantization_bits or config.lm_head_bits:
        lowbit.lower(proto, accuracy_level=0)
    fuse.skip_norms(proto)
    slack = stacked_decode.add_decode_branch(proto, threshold=1)  # checked from 1: see export()
    save_graph(proto, path)
    return slack


def save_graph(proto, path: Path) -> None:
    """Write ``proto`` to ``path`` with every weight in the one external data file the
    layout names (replacing any there: onnx appends to an existing data file)."""
    import onnx  # heavy: imported where used (a plain glmrt command never loads it), as below

    data = path.parent / layout.DATA
    data.unlink(missing_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=layout.DATA)
    if not data.is_file():  # the layout promises this name
        raise GLMError(f"the exporter did not write {layout.DATA} beside {path.name}", path.parent)


# ----------------------------------------------------------------- the entry
QUANTIZE = {"int8": 8, "int4": 4}


def export(config: GLMConfig, state: dict[str, torch.Tensor], out: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
           quantize: str | None = None, tokenizer: str | os.PathLike | None = None, overwrite: bool = False,
           progress: bool = True) -> dict:
    """Write the export directory ``out`` atomically; returns a report dict with the
    measured error against PyTorch, and for a quantized graph its logit error against the
    unquantized model (``quantize`` quantizes ``state`` first, with ``glmrt quantize``'s
    default scheme).

    A quantized graph is checked twice: with fp32 activations it must reproduce PyTorch's
    quantized model within :data:`~.check.CHECK_ATOL` (the lowering is exact); it is saved
    with int8 activations (:data:`~.lowbit.ACCURACY_LEVEL`), whose error is measured.
    """
    if opset < layout.MIN_OPSET:
        raise GLMError(f"opset {opset} is too old: the export needs >= {layout.MIN_OPSET}")
    if quantize not in (None, *QUANTIZE):
        raise GLMError(f"unknown quantization {quantize!r} (supported: {', '.join(QUANTIZE)})")
    if quantize and config.quantization_bits:
        raise GLMError(f"the checkpoint is already quantized to INT{config.quantization_bits}")
    stages = ["build the reference model", "export the graph", "check against PyTorch", "write metadata"]
    report: dict = {"family": config.family, "opset": opset}
    bar = tqdm(total=len(stages), desc="export-onnx", unit="step", disable=not progress)
    step = iter(stages)

    def next_stage():
        bar.set_postfix_str(next(step))

    with atomic_dir(out, overwrite) as tmp, bar:
        tmp = Path(tmp)
        next_stage()
        float_model = None
        if quantize:
            float_model = export_model(config, state, opset)
            config, state = quantize_scheme(config, state, QUANTIZE[quantize])
        model = export_model(config, state, opset)
        if (config.quantization_bits or config.lm_head_bits) and float_model is None:
            float_model = export_model(*dequantize_state(config, state), opset)
        bar.update()
        next_stage()
        graph = tmp / layout.GRAPH
        slack = export_graph(model, graph, opset)
        bar.update()
        next_stage()
        err = compare_with_torch(model, session_runner(cpu_session(graph), config))
        if not err <= CHECK_ATOL:
            raise GLMError(f"the exported graph disagrees with PyTorch: max |logits difference| {err:.3g} > "
                           f"{CHECK_ATOL} (an exporter problem; the export was not written)")
        report["max_abs_error_vs_torch"] = err
        if slack:  # the check's decode step ran the stacked branch; now only long caches take it
            edit_graph(graph, lambda proto: stacked_decode.set_threshold(proto, stacked_decode.STACK_FROM))
        extra = {"export_max_abs_error_vs_torch": f"{err:.3g}"}
        if cached_attention.applies(config, opset):
            extra[layout.KV_CACHE] = layout.KV_IN_PLACE
            extra[layout.KV_SLACK] = str(slack)
        precision = "fp32"
        if float_model is not None:
            set_accuracy_level(graph, lowbit.ACCURACY_LEVEL)
            report["quantized"] = quantization_error(cpu_session(graph), float_model, config)
            extra["quantized_error_vs_fp32"] = report["quantized"]
            precision = f"int{config.quantization_bits}" if config.quantization_bits else "fp32 (INT8 head)"
        bar.update()
        next_stage()
        write_metadata(graph, layout.metadata(config, precision, extra))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / layout.TOKENIZER)
        layout.read_export(tmp)  # what the runtime will check, checked now
        bar.update()
    report["precision"] = precision
    report["files"] = {f.name: f.stat().st_size for f in sorted(Path(out).iterdir())}
    return report


def edit_graph(graph: Path, edit) -> None:
    """Apply ``edit`` to the graph file's proto and write it back atomically, leaving its
    external data (the weights) in place."""
    import onnx  # heavy: imported where used (a plain glmrt command never loads it)

    proto = onnx.load(str(graph), load_external_data=False)
    edit(proto)
    tmp = graph.with_suffix(".onnx.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(graph)


def set_accuracy_level(graph: Path, level: int) -> None:
    """Set ``accuracy_level`` on every ``MatMulNBits`` of the graph file (weights untouched)."""
    def edit(proto):
        for n in layout.nodes(proto.graph):
            if n.op_type == "MatMulNBits":
                for a in n.attribute:
                    if a.name == "accuracy_level":
                        a.i = level
    edit_graph(graph, edit)


def write_metadata(graph: Path, meta: dict[str, str]) -> None:
    """Set metadata_props on the graph file, leaving its external data in place."""
    def edit(proto):
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
    edit_graph(graph, edit)


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, sat_args: str | None = None, **kwargs) -> dict:
    """Read any supported checkpoint directory and export it (see :func:`export`)."""
    _, config, state, tok = load_checkpoint(src, progress=kwargs.get("progress", True), sat_args=sat_args)
    return export(config, state, out, tokenizer=tok, **kwargs)
