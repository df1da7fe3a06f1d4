"""INT8 variant of an export: onnxruntime's dynamic quantisation.

Weights of every MatMul (the layers' projections and the LM head) become int8 with one
scale per output channel; activations are quantised to uint8 per tensor at run time
(``DynamicQuantizeLinear`` + ``MatMulInteger``). Embedding lookups, norms, rotary and
the softmax stay fp32. The error against the fp32 graph is measured on a fixed
blank-infilling prompt and stored in the export's metadata.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from glm_core.config import GLMConfig
from glm_core.errors import GLMError
from glm_core.masks import prefill_inputs

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


def int8_error(fp32_session, int8_session, config: GLMConfig, seed: int = 0) -> dict:
    """Logit error of the int8 graph against the fp32 one on real positions of the
    sample prompt (prefill): max and mean |difference|, both relative to max |logit|,
    and how often the two agree on the most likely next token."""
    from .export import empty_past, sample_prompt

    ids, pad = sample_prompt(config, seed)
    pos, mask, _ = prefill_inputs(config, ids, pad)
    feed = layout.feeds(config, ids, pos, mask, empty_past(config, ids.shape[0]))
    ref = fp32_session.run(["logits"], feed)[0][pad.bool().numpy()]
    got = int8_session.run(["logits"], feed)[0][pad.bool().numpy()]
    diff = np.abs(got - ref)
    scale = float(np.abs(ref).max())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_abs_logit": scale,
            "max_rel": float(diff.max()) / scale, "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "positions": int(ref.shape[0])}
