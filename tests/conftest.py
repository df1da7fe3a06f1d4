"""Shared fixtures: tiny transformers GLM checkpoints and a tiny sentencepiece model.

Nothing is downloaded: checkpoints are written by transformers' own ``save_pretrained``
from random weights, and the tokenizer is trained on the bundled corpus.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
# exports the onnx backend makes on demand go to a directory of this test run, never into
# the user's cache (subprocesses inherit it)
os.environ["GLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="glm-test-cache-")
atexit.register(shutil.rmtree, os.environ["GLM_CACHE_DIR"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Tiny shapes that keep every architectural feature under test: grouped KV heads (4 query
# heads, 2 groups), partial rotary (factor 0.5), and head_dim (24) != hidden/heads (16).
HF_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=24, partial_rotary_factor=0.5,
               max_position_embeddings=256, pad_token_id=0, eos_token_id=[1], attention_bias=True,
               rope_theta=10000.0)


def make_hf_model(kind: str, seed: int = 0, std: float = 0.1, **overrides):
    """A random-weight transformers GlmForCausalLM ('glm') or Glm4ForCausalLM ('glm4').

    Weights are drawn with std 0.1 (larger than the usual 0.02 init; norm gains 1 + N(0, 0.1))
    so that attention patterns and logits are far from uniform and differences would show.
    """
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    cfg_cls, model_cls = {"glm": (GlmConfig, GlmForCausalLM), "glm4": (Glm4Config, Glm4ForCausalLM)}[kind]
    kw = dict(HF_TINY, **overrides)
    theta = kw.pop("rope_theta")
    partial = kw.pop("partial_rotary_factor")
    cfg = cfg_cls(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta,
                                         "partial_rotary_factor": partial})
    torch.manual_seed(seed)
    m = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0.0, std)
            if "norm" in name:
                p.add_(1.0)  # norm gains around 1, as in trained models
    return m


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Saved tiny checkpoints: {'glm': path, 'glm4': path} (safetensors, one shard)."""
    out = {}
    for kind in ("glm", "glm4"):
        d = tmp_path_factory.mktemp(f"hf-{kind}")
        make_hf_model(kind).save_pretrained(d)
        out[kind] = d
    return out


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A 400-piece sentencepiece model trained on the bundled corpus."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(input=str(ROOT / "data" / "corpus" / "en_python_docs.txt"),
                                   model_prefix=str(d / "tok"), vocab_size=400, model_type="unigram",
                                   num_threads=1, bos_id=-1, eos_id=2, unk_id=0, pad_id=1, minloglevel=2)
    return d / "tok.model"


def left_padded_batch(vocab: int, lengths=(12, 7, 9), pad_id: int = 0, seed: int = 1):
    """ids [B, T] and mask [B, T] (1 = real), rows left-padded to the longest length."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(2, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def peaked_state(cfg, seed: int = 0, salt: int = 0) -> dict:
    """Random native weights that make layout mistakes visible in the logits: biases and
    norm gains off their defaults, QKV weights large enough for peaked attention (so
    position and mask errors change the logits), and an output head of unit scale (the
    embedding when tied). ``salt`` offsets the generator of the perturbations."""
    from glm_runtime.core.build import random_state

    g = torch.Generator().manual_seed(seed + salt)
    head = "embed.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    sd = random_state(cfg, seed)
    for k, v in sd.items():
        if k.endswith("bias"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif "qkv.weight" in k:
            sd[k] = torch.randn(v.shape, generator=g) * 0.3
        elif "norm" in k:
            sd[k] = 1 + torch.randn(v.shape, generator=g) * 0.1
        elif k == head:
            sd[k] = torch.randn(v.shape, generator=g)
    return sd


@pytest.fixture(scope="session")
def mpiexec() -> Path:
    """The ``mpiexec`` of this environment (the ``mpi`` extra's MPICH). The test command
    (scripts/test.sh) fails when its set-up left none, so CI always runs the tests that use
    it; an environment installed without the extra skips them with the reason."""
    exe = Path(sys.executable).parent / "mpiexec"
    if not exe.exists():
        pytest.skip("mpiexec is not installed in this environment (pip install glm-runtime[mpi])")
    return exe
