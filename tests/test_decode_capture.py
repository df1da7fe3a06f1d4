"""Recorded decode steps (``DecodeBatch.capture_with`` over ``Backend.capture``) on the host.

No device graph exists here, so the hook is driven by backends that stand in for one: the
base class (no capture), one whose capture returns the function itself, and one whose
capture has a device record's semantics without the device (``eager_capture``: warm-up
runs with their side effects, inputs copied into static buffers, outputs overwritten by
every call). Each must give exactly the tokens and logits of plain fixed-shape steps, and
a capture that replays stale inputs must be caught by the same comparison.
"""
from __future__ import annotations

import pytest
import torch

from glm_runtime.backends.cpu.plugin import CPUBackend
from glm_runtime.conformance.model_check import kit_config, kit_prompt, kit_state
from glm_runtime.core.build import build_model
from glm_runtime.core.generation import DecodeBatch, SamplingConfig, generate
from glm_runtime.core.masks import prefill_inputs
from glm_runtime.core.registry.capture import StaticCall, eager_capture

STEPS = 6


class Identity(CPUBackend):
    def capture(self, fn, example_inputs):
        return fn


class Recording(CPUBackend):
    """Device-record semantics without the device; counts its captures."""

    def __init__(self):
        self.captures = 0

    def capture(self, fn, example_inputs):
        self.captures += 1
        return eager_capture(fn, example_inputs, warmup=2)


class StaleInputs(CPUBackend):
    """A broken capture: it replays with the inputs it was recorded with."""

    def capture(self, fn, example_inputs):
        rec = eager_capture(fn, example_inputs)
        return lambda *inputs: rec(*rec.static_inputs)


@pytest.fixture(scope="module", params=["tiny-glm-4", "tiny-chatglm-6b", "tiny-glm-130b"])
def model(request):
    config = kit_config(request.param)
    return build_model(config, kit_state(config), CPUBackend(), strict_ops=True)


def start(model, backend=None):
    config = model.config
    ids, am = kit_prompt(config)
    B, T = ids.shape
    batch = DecodeBatch(model, B, T + STEPS + 1)
    pos, mask, state = prefill_inputs(config, ids, am)
    logits = batch.prefill(slice(0, B), ids, pos, mask, real=state.real, logits_index=torch.tensor([T - 1]))[:, -1]
    batch.begin_decode(slice(0, B), state)
    if backend is not None:
        batch.capture_with(backend)
    return batch, logits


@torch.inference_mode()
def run(model, backend=None, schedule=(2,) * STEPS, forced=False):
    """Greedy fixed-shape steps (``forced``: tokens 10 + step, 20 + step instead, so that
    every step feeds new ones); ``schedule`` says how many rows each step feeds. Returns
    the tokens [steps, B] and a copy of every step's logits, and the batch."""
    batch, logits = start(model, backend)
    tok = logits.argmax(-1)
    toks, outs = [], []
    for i, n in enumerate(schedule):
        if forced:
            tok = torch.tensor([10 + i, 20 + i])
        logits = batch.step(n, tok[:n], fixed_shape=True)
        outs.append(logits.clone())  # a recorded step's logits are overwritten by the next step
        tok = torch.cat((logits.argmax(-1), tok[n:]))
        toks.append(tok.clone())
    return torch.stack(toks), outs, batch


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_fixed_shape_steps_give_generate_tokens(model):
    toks, _, _ = run(model)
    ids, am = kit_prompt(model.config)
    out = generate(model, ids, am, SamplingConfig(max_new_tokens=STEPS + 1), pad_token_id=0)
    assert torch.equal(out[:, ids.shape[1] + 1:].T, toks)


def test_no_capture_identity_and_recorded_steps_match_plain_steps(model):
    toks, logits, _ = run(model)
    for backend, rows in ((CPUBackend(), []), (Identity(), [2]), (Recording(), [2])):
        t, lg, batch = run(model, backend)
        assert torch.equal(t, toks) and same(lg, logits), type(backend).__name__
        assert batch.recorded_rows == rows


def test_one_record_per_row_count_and_rows_advance_apart(model):
    schedule = (2, 1, 1, 2, 1, 2)
    toks, logits, plain = run(model, schedule=schedule)
    rec = Recording()
    t, lg, batch = run(model, rec, schedule=schedule)
    assert torch.equal(t, toks) and same(lg, logits)
    assert rec.captures == 2 and batch.recorded_rows == [1, 2]
    assert batch.host_length == plain.host_length and torch.equal(batch.length, plain.length)
    assert batch.host_length[0] == batch.host_length[1] + 3  # row 0 took three more steps


def test_a_capture_replaying_stale_inputs_is_caught(model):
    _, logits, _ = run(model, forced=True)
    _, lg, _ = run(model, Recording(), forced=True)
    assert same(lg, logits)
    _, lg, _ = run(model, StaleInputs(), forced=True)
    assert torch.equal(lg[0], logits[0]) and not same(lg, logits)  # right at the recording step only


def test_static_call_copies_inputs_and_refuses_other_shapes():
    seen = []

    def fn(x):
        seen.append(x)
        return x * 2

    call = eager_capture(fn, (torch.ones(3),), warmup=1)
    assert len(seen) == 2 and all(s is call.static_inputs[0] for s in seen)  # warm-up + the recording run
    out = call(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(out, torch.tensor([2.0, 4.0, 6.0])) and out is call.outputs
    assert torch.equal(call.static_inputs[0], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="recorded with"):
        call(torch.ones(4))
    with pytest.raises(ValueError, match="takes 1 tensor"):
        call(torch.ones(3), torch.ones(3))
    assert isinstance(call, StaticCall)
