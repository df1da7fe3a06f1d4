"""INT8 variant of an export: onnxruntime's dynamic quantisation.

Weights of every MatMul (the layers' projections and the LM head) become int8 with one
scale per output channel; activations are quantised to uint8 per tensor at run time
(``DynamicQuantizeLinear`` + ``MatMulInteger``). Embedding lookups, norms, rotary and
the softmax stay fp32. The error against the fp32 graph is measured by
:func:`~.check.int8_error` and stored in the export's metadata.
"""
from __future__ import annotations

import logging
from pathlib import Path

from glm_runtime.core.errors import GLMError

from . import layout


def quantize_int8(graph: Path, out_dir: Path) -> Path:
    """Write ``out_dir/model.onnx`` (+ external data), the int8 version of ``graph``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / layout.GRAPH
    lg = logging.getLogger()
    level = lg.level
    lg.setLevel(logging.ERROR)  # the quantizer logs per-node info at the root logger
    try:
        quantize_dynamic(graph, target, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    except Exception as e:  # noqa: BLE001 - name the stage, keep the cause
        raise GLMError(f"onnxruntime quantize_dynamic failed: {type(e).__name__}: {e}") from e
    finally:
        lg.setLevel(level)
    data = [p for p in out_dir.iterdir() if p.name != layout.GRAPH]
    if len(data) != 1:
        raise GLMError(f"expected one external data file from the quantizer, got {[p.name for p in data]}", out_dir)
    if data[0].name != layout.DATA:
        _relocate(target, data[0].name, layout.DATA)
        data[0].rename(out_dir / layout.DATA)
    return target


def _relocate(graph: Path, old: str, new: str) -> None:
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    for t in layout.tensors(proto):
        for e in t.external_data:
            if e.key == "location" and e.value == old:
                e.value = new
    onnx.save(proto, str(graph))
