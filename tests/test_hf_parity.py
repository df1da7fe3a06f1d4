"""Logits and greedy tokens of our cpu backend against transformers' own GLM models.

Tolerance: max |logit difference| <= 1e-4 in fp32 on non-pad positions. Both sides
compute in fp32 with the same formulas; what differs is summation order (our fused QKV
matmul vs three matmuls, SDPA vs eager kernels), which leaves differences of a few fp32
ulps of the logits (|logits| ~ 1-10 here, ulp ~ 1e-6), far below 1e-4.
"""
from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, make_hf_model

from glm_runtime import load_model

TOL = 1e-4


def hf_positions(mask):
    # transformers' forward uses 0..T-1 unless told; GLM's tokenizers give real tokens
    # positions from 0 and pads 0 (as generate() does), so pass those explicitly.
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_logits_match_transformers(kind, hf_dirs):
    ref = make_hf_model(kind)
    ours = load_model(hf_dirs[kind], backend="cpu", strict_ops=True)
    ids, mask = left_padded_batch(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert got.shape == want.shape
    assert (got - want).abs()[real].max().item() <= TOL
    assert want[real].abs().max() > 1.0  # the comparison is not between near-zero logits


@pytest.mark.parametrize("kind", ["glm", "glm4"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_32_tokens_match_transformers(kind, use_cache, hf_dirs):
    ref = make_hf_model(kind)
    ours = load_model(hf_dirs[kind], backend="cpu")
    ids, mask = left_padded_batch(ref.config.vocab_size, lengths=(10, 6))
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=32, stop_token_ids=[], use_cache=use_cache)
    assert want.shape == (2, ids.shape[1] + 32)
    assert torch.equal(got, want)


def test_unpadded_single_sequence_and_rope_theta(tmp_path):
    """A different rope base and tied embeddings go through the converter correctly."""
    ref = make_hf_model("glm", seed=3, rope_theta=5e6, tie_word_embeddings=True)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, backend="cpu")
    assert ours.config.rope_base == 5e6 and ours.config.tie_word_embeddings
    ids = torch.randint(2, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    assert (ours(ids) - want).abs().max().item() <= TOL


def test_sharded_checkpoint_with_index(tmp_path):
    ref = make_hf_model("glm4", seed=5)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_model(tmp_path, backend="cpu")
    ids = torch.randint(2, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    assert (ours(ids) - want).abs().max().item() <= TOL
