"""Generation: sampling filters against transformers' logits processors, seeding, stop
tokens, streaming, and the KV-cache path against full recomputation for every family."""
from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch

from glm_runtime.api import GLM
from glm_runtime.core.build import build_model
from glm_runtime.core.errors import GLMError
from glm_runtime.core.generation import (TOP_P_CANDIDATES, SamplingConfig, check_finite, greedy, process_logits,
                                            sample, top_p_keep)
from glm_runtime.core.presets import preset
from glm_runtime.core.registry import get_backend


def tiny(name, **over):
    cfg = preset(name, **over)
    return GLM(build_model(cfg, None, get_backend("cpu"), seed=0), get_backend("cpu"))


@pytest.mark.parametrize("top_k,top_p,temp", [(0, 0.8, 1.0), (5, 1.0, 1.0), (7, 0.6, 0.7), (0, 1.0, 1.5)])
def test_logit_processing_matches_transformers(top_k, top_p, temp):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    want = logits.clone()
    if temp != 1.0:
        want = TemperatureLogitsWarper(temp)(None, want)
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    got = process_logits(logits, SamplingConfig(top_k=top_k, top_p=top_p, temperature=temp))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


@pytest.mark.parametrize("spread", [8.0, 0.05])  # peaked: among the candidates; flat: the full sort
def test_top_p_over_a_large_vocabulary_matches_transformers(spread):
    from transformers import TopPLogitsWarper

    logits = torch.randn(2, 20000, generator=torch.Generator().manual_seed(1)) * spread
    want = TopPLogitsWarper(0.8)(None, logits.clone())
    keep = top_p_keep(logits, 0.8)
    assert torch.equal(keep, ~torch.isinf(want))
    assert (int(keep.sum(-1).max()) < TOP_P_CANDIDATES) == (spread > 1)  # both paths taken


def test_sampling_draws_each_token_by_its_probability():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    probs[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # the last token, all the mass
    got = sample(probs, torch.Generator().manual_seed(0))
    assert got[0] == 5
    freq = torch.bincount(got[1:], minlength=6) / (len(got) - 1)
    assert freq[[0, 2, 5]].sum() == 0  # probability 0 is never drawn
    assert torch.allclose(freq[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)  # > 4 sigma at n=20000


def test_greedy_is_torch_argmax_first_index_at_ties():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    logits[1, [7, 500]] = 100.0  # a tie: the first index wins, as in torch.argmax
    logits[2, :] = 0.0
    got = greedy(logits[:, :999])  # a non-contiguous view, as generation's logits[:, -1] is
    assert got.dtype == torch.long and torch.equal(got, logits[:, :999].argmax(-1))
    assert got.tolist()[1:] == [7, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy's reduction, torch's
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_name_the_step(bad, dtype):
    logits = torch.zeros(2, 50, dtype=dtype)
    check_finite(logits, 3)
    logits[1, 17] = bad
    with pytest.raises(GLMError, match="non-finite logits at generation step 3"):
        check_finite(logits, 3)


def test_sampling_is_seeded():
    m = tiny("tiny-glm-4")
    ids = torch.tensor([[5, 6, 7, 8]])
    a = m.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.9, seed=3, stop_token_ids=[])
    b = m.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.9, seed=3, stop_token_ids=[])
    c = m.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.9, seed=4, stop_token_ids=[])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stop_tokens_pad_finished_rows_and_end_early():
    m = tiny("tiny-chatglm2")
    ids, mask = left_padded_batch(1000, lengths=(6, 4))
    free = m.generate(ids, mask, max_new_tokens=6, stop_token_ids=[])
    stop = int(free[0, ids.shape[1] + 1])  # row 0's second generated token becomes a stop token
    out = m.generate(ids, mask, max_new_tokens=6, stop_token_ids=[stop])
    row0 = out[0, ids.shape[1]:].tolist()
    assert row0[1] == stop and all(t == m.config.pad_token_id for t in row0[2:])
    both = m.generate(ids, mask, max_new_tokens=6, stop_token_ids=free[:, ids.shape[1]].tolist())
    assert both.shape[1] == ids.shape[1] + 1  # every row stopped at once: generation ended


def test_streaming_callback_sees_every_step():
    m = tiny("tiny-glm-4-0414")
    seen = []
    out = m.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=5, stop_token_ids=[], streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 3:])


FAMILIES = ["tiny-glm-4", "tiny-glm-4-0414", "tiny-chatglm2", "tiny-glm-130b", "tiny-chatglm-6b"]


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decoding_equals_recomputation(name):
    """The preallocated KV cache + incremental masks/positions give the same greedy tokens
    as recomputing the whole sequence every step, with left padding, for every family."""
    m = tiny(name)
    c = m.config
    ids, mask = left_padded_batch(1000, lengths=(7, 5))
    if c.attention == "prefix":  # blank-infilling prompts: [MASK] in one row, [gMASK] in the other
        ids[0, -3], ids[0, -1] = c.mask_token_id, c.sop_token_id
        ids[1, -2], ids[1, -1] = c.gmask_token_id, c.sop_token_id
    a = m.generate(ids, mask, max_new_tokens=16, stop_token_ids=[], use_cache=True)
    b = m.generate(ids, mask, max_new_tokens=16, stop_token_ids=[], use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_padding_does_not_change_real_token_logits(name):
    m = tiny(name)
    ids, mask = left_padded_batch(1000, lengths=(9, 5))
    batch = m(ids, mask)
    alone = m(ids[1:, -5:])
    torch.testing.assert_close(batch[1, -5:], alone[0], atol=1e-5, rtol=1e-5)
