"""Build the bundled demo model: a deterministic *random-weight* GLM-4-style model with a
sentencepiece tokenizer trained on the bundled corpus.

It exists so the main command generates text on a fresh machine with no downloads. Its
weights are random (seed 0), so the text it produces is fluent-looking noise made of
real tokens, not language; it is replaced by a trained model once one is shipped.

    python scripts/make_demo_model.py glm_core/assets/demo
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import sentencepiece as spm

from converters import native
from glm_core import GLMConfig
from glm_core.api import random_state

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = 5  # [MASK] [gMASK] [sMASK] sop eop, appended after the pieces


def train_tokenizer(corpus: list[Path], prefix: Path, vocab: int) -> Path:
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in corpus), model_prefix=str(prefix), vocab_size=vocab,
        model_type="unigram", character_coverage=0.9995, num_threads=1, seed_sentencepiece_size=200000,
        shuffle_input_sentence=False, bos_id=-1, eos_id=2, unk_id=0, pad_id=1, minloglevel=2)
    return prefix.with_suffix(".model")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    corpus = sorted((ROOT / "data" / "corpus").glob("*.txt"))
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_tokenizer(corpus, Path(tmp) / "tokenizer", a.vocab)
        n = a.vocab
        cfg = GLMConfig(family="glm-4-9b", vocab_size=n + SPECIALS, hidden_size=128, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=32, ffn_hidden_size=256, max_position_embeddings=1024,
                        rope_base=10000.0, query_key_layer_scaling=True, pad_token_id=1, eos_token_ids=[2],
                        mask_token_id=n, gmask_token_id=n + 1, smask_token_id=n + 2, sop_token_id=n + 3,
                        eop_token_id=n + 4)
        native.save(a.out, cfg, random_state(cfg, seed=0), tokenizer=sp, overwrite=a.force)
    print(f"wrote {a.out}: {cfg.num_parameters() / 1e6:.2f}M parameters, random weights (seed 0)")


if __name__ == "__main__":
    main()
