"""Model-level check: a tiny model of each GLM family on the target against the reference ops.

Same random weights on both sides (the target's copy rounded to the dtype under test;
the reference -- the contract's reference ops, on the host -- computes in fp32 from the
same rounded weights). The output projection is
scaled up so that logits spread over several units and greedy choices are not near-ties
by construction.

Bound. Each op of the contract may err by ``atol + rtol |ref|`` (its dtype's row in the
tolerance table); errors of successive ops add at most linearly through a normalised
network, so logits are held to ``n_ops`` times that bound, where ``n_ops = 9 * layers + 3``
counts the ops in series (per layer: norm, qkv, rotary, attention, dense, norm, fc1,
activation, fc2 -- the q and k rotaries run side by side; then embedding, final norm,
head). For fp32 that is ~2e-4 on a 2-layer model, for fp16 ~4e-2. A quantized model's
linears may round their activations to 8 bits (the contract's ``quantized_linear`` rule),
so its bound uses the bf16 row of the table, bf16 having 8 significant bits.

Greedy tokens: the reference generates; the target must choose the same token at every
step unless the reference's margin between its choice and the target's choice is within twice
the logit bound (a tie at the contract's precision). Checked teacher-forced (full
sequence, prefill path) and through the target's own KV-cache generation (decode path),
where the comparison stops at the first such tie.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glm_runtime.api import GLM
from glm_runtime.converters.quantize import quantize_state
from glm_runtime.core.build import build_model, random_state, reference_model
from glm_runtime.core.ops.contract import tolerance
from glm_runtime.core.presets import preset
from glm_runtime.core.quant import keeps_stored_dtype
from glm_runtime.core.registry.selection import discover

from .target import DeviceView, Target

FAMILIES = ("tiny-glm-130b", "tiny-chatglm-6b", "tiny-chatglm2", "tiny-glm-4-0414")


@dataclass
class ModelResult:
    ok: bool
    detail: str


VOCAB = 320  # small vocabulary: the check is about the layers, not a 150k-row head
SMALL_TOKENS = dict(pad_token_id=0, eos_token_ids=[2], mask_token_id=300, gmask_token_id=301, smask_token_id=302,
                    sop_token_id=303, eop_token_id=304)


def kit_config(family: str, bits: int | None = None):
    """The family's tiny preset with a 320-token vocabulary (special ids moved inside it)."""
    c = preset(family)
    tokens = {k: v for k, v in SMALL_TOKENS.items() if getattr(c, k) not in (None, [])}
    return preset(family, vocab_size=VOCAB, quantization_bits=bits, **tokens)


def kit_prompt(config):
    """Two rows, the second left-padded; prefix families get [gMASK] <sop> as in blank infilling."""
    body = [11, 25, 37, 48, 59, 61, 73]
    if config.attention == "prefix":
        g = config.gmask_token_id if config.gmask_token_id is not None else config.mask_token_id
        body = body + [g, config.sop_token_id]
    ids = torch.tensor([body, [0, 0] + body[2:]])
    am = torch.ones_like(ids)
    am[1, :2] = 0
    return ids, am


def kit_state(float_config) -> dict[str, torch.Tensor]:
    """Random weights whose output projection is scaled up so that logits spread over
    several units: greedy choices are then not near-ties by construction."""
    state = random_state(float_config, seed=1234)
    out_key = "embed.weight" if float_config.tie_word_embeddings else "lm_head.weight"
    state[out_key] = state[out_key] * 20.0
    return state


def _state(config, bits):
    float_config = config.replace(quantization_bits=None)
    state = kit_state(float_config)
    return quantize_state(float_config, state, bits)[1] if bits else state


def _cast(state, dtype):
    return {k: v if keeps_stored_dtype(k, v) else v.to(dtype) for k, v in state.items()}


def compare(target: Target, family: str, dtype: torch.dtype, bits: int | None = None, strict: bool = False,
            new_tokens: int = 5) -> ModelResult:
    config = kit_config(family, bits)
    state = _cast(_state(config, bits), dtype)
    cpu = discover()["cpu"].backend
    ref_model = GLM(reference_model(config, state), cpu)
    view = DeviceView(target.backend, target.device, dtype, target.kernels)
    model = GLM(build_model(config, {k: v.clone() for k, v in state.items()}, view, strict_ops=strict), view)

    ids, am = kit_prompt(config)
    atol, rtol = tolerance(dtype)
    if bits:  # activations rounded to 8 bits on the way into each quantized linear
        atol, rtol = (max(a, b) for a, b in zip((atol, rtol), tolerance(torch.bfloat16)))
    n_ops = 9 * config.num_layers + 3
    atol, rtol = n_ops * atol, n_ops * rtol

    ref_out = ref_model.generate(ids, attention_mask=am, max_new_tokens=new_tokens, stop_token_ids=[])
    full_am = torch.cat((am, torch.ones(ids.shape[0], ref_out.shape[1] - ids.shape[1], dtype=am.dtype)), 1)
    ref_logits = ref_model(ref_out, full_am)
    logits = model(ref_out, full_am).cpu()
    real = full_am.bool()
    err = (logits - ref_logits).abs()[real].flatten()
    bound = (atol + rtol * ref_logits.abs())[real].flatten()
    if not bool((err <= bound).all()):
        worst = int((err / bound).argmax())
        return ModelResult(False, f"{family} {dtype}: logits differ by up to {float(err.max()):.4g} "
                                  f"(bound {atol:.3g} + {rtol:.3g}|ref|, worst element {float(err[worst]):.4g} vs "
                                  f"{float(bound[worst]):.4g})")
    T0 = ids.shape[1]
    for b in range(ids.shape[0]):  # teacher-forced greedy agreement
        for t in range(T0 - 1, ref_out.shape[1] - 1):
            want = int(ref_out[b, t + 1])
            got = int(logits[b, t].argmax())
            if got != want and float(ref_logits[b, t, want] - ref_logits[b, t, got]) > 2 * (atol + rtol * abs(float(ref_logits[b, t, want]))):
                return ModelResult(False, f"{family} {dtype}: row {b} step {t - T0 + 1}: picks token {got}, the reference picks "
                                          f"{want} by a margin beyond the bound")
    out = model.generate(ids, attention_mask=am, max_new_tokens=new_tokens, stop_token_ids=[]).cpu()
    for b in range(ids.shape[0]):  # decode path through the target's KV cache
        for t in range(T0, ref_out.shape[1]):
            got, want = int(out[b, t]), int(ref_out[b, t])
            if got == want:
                continue
            margin = float(ref_logits[b, t - 1, want] - ref_logits[b, t - 1, got])
            if margin > 2 * (atol + rtol * abs(float(ref_logits[b, t - 1, want]))):
                return ModelResult(False, f"{family} {dtype}: cached generation row {b} step {t - T0}: token {got}, "
                                          f"reference {want} (margin {margin:.4g})")
            break  # a tie at this precision: later tokens legitimately differ
    return ModelResult(True, f"{family} {dtype}: max logit error {float(err.max()):.3g} "
                             f"(bound {atol:.3g} + {rtol:.3g}|ref|); greedy tokens agree")
