"""Checking an export against the PyTorch graph it was traced from.

Every export is compared with :meth:`GLMModel.forward` on a fixed blank-infilling prompt
with a left-padded row, for the prefill and for one decode step through the cache; a
quantized graph is measured against the unquantized model (error and top-1 agreement,
stored in the export's metadata).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import GLMError
from glm_runtime.core.masks import decode_inputs, prefill_inputs
from glm_runtime.core.model import GLMModel

from . import layout

# fp32 logits of the same graph computed by two implementations: reductions are
# reordered (blocked MatMul, fused Softmax), which moves logits of magnitude ~1 by a few
# 1e-7; 1e-4 leaves a wide margin while any real lowering error is orders larger.
CHECK_ATOL = 1e-4


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
    cache = layout.ConcatCache(layout.empty_past(config, ids.shape[0]))
    with torch.inference_mode():
        ref = model(ids, pos, mask, cache=cache)
    if not bool(torch.isfinite(ref[pad_mask.bool()]).all()):  # not the exporter's fault: say what it is
        raise GLMError("the model computes non-finite logits (NaN/inf in its weights, or an overflow): "
                       "its export cannot be checked")
    got, present = run(ids, pos, mask, cache.past)
    real = pad_mask.bool().numpy()
    err = float(np.abs(got - ref.numpy())[real].max())
    for (k, v), (gk, gv) in zip(cache.present, zip(present[0::2], present[1::2])):
        err = max(err, float(np.abs(gk - k.numpy()).max()), float(np.abs(gv - v.numpy()).max()))
    nxt = ref[:, -1].argmax(-1, keepdim=True)
    pos1, mask1 = decode_inputs(state)
    mask1 = state.real[:, None, None, :] if mask1 is None else mask1
    cache = layout.ConcatCache(tuple(cache.present))
    with torch.inference_mode():
        ref1 = model(nxt, pos1, mask1, cache=cache, start=ids.shape[1])
    got1, _ = run(nxt, pos1, mask1, cache.past)
    return max(err, float(np.abs(got1 - ref1.numpy()).max()))


def cpu_session(graph: Path):
    import onnxruntime as ort  # heavy: imported where used (a plain glmrt command never loads it)

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])


def session_runner(session, config: GLMConfig):
    def run(ids, pos, mask, past):
        out = session.run(None, layout.feeds(config, ids, pos, mask, past))
        return out[0], out[1:]
    return run


def quantization_error(session, float_model: GLMModel, config: GLMConfig, seed: int = 0) -> dict:
    """Logit error of a quantized graph against the unquantized model on the real positions
    of the sample prompt (prefill): max and mean |difference|, both relative to max |logit|,
    and how often the two agree on the most likely next token."""
    ids, pad = sample_prompt(config, seed)
    pos, mask, _ = prefill_inputs(config, ids, pad)
    with torch.inference_mode():
        ref = float_model(ids, pos, mask)[pad.bool()].numpy()
    got = session.run(["logits"], layout.feeds(config, ids, pos, mask, layout.empty_past(config, ids.shape[0])))[0]
    got = got[pad.bool().numpy()]
    diff = np.abs(got - ref)
    scale = float(np.abs(ref).max())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_abs_logit": scale,
            "max_rel": float(diff.max()) / scale, "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "positions": int(ref.shape[0])}
