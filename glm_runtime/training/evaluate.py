"""Held-out perplexity of a trained GLM against a unigram baseline, also for INT8/INT4.

For each blank-infilling objective ([gMASK] continuation, [MASK] spans) a fixed set of
held-out rows is built by the training collator (fixed seed). The model's perplexity is
``exp(mean NLL)`` over the Part-B text tokens it must predict; the unigram baseline scores
the very same tokens with add-one-smoothed token frequencies of the training split. The
``eop`` targets are left out of both (a unigram model cannot predict where a span ends).

    python -m glm_runtime.training.evaluate MODEL_DIR --shards RUN_DIR/shards [--bits 8 4]
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from glm_runtime.converters import native
from glm_runtime.converters.quantize import SCHEMES, quantize_scheme
from glm_runtime.core.build import build_model
from glm_runtime.core.registry import get_backend
from glm_runtime.core.tokenizer import Tokenizer

from .collator import IGNORE, Collator, ObjectiveConfig, SpecialIds
from .data import TokenStream


def unigram_logprobs(train: TokenStream, vocab_size: int) -> torch.Tensor:
    counts = np.bincount(np.asarray(train.tokens), minlength=vocab_size).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


@torch.no_grad()
def perplexities(model, stream: TokenStream, ids: SpecialIds, objective: ObjectiveConfig, seq_len: int,
                 rows: int, unigram: torch.Tensor, seed: int = 7, micro: int = 8) -> dict:
    col = Collator(stream, seq_len, objective, ids, seed=seed)
    nll = uni = 0.0
    n = 0
    for _ in range(math.ceil(rows / micro)):
        b = col.next_batch(micro)
        logits = model(b.input_ids, b.position_ids, b.mask).float()
        keep = (b.targets != IGNORE) & (b.targets != ids.eop)
        t = b.targets[keep]
        lp = torch.log_softmax(logits[keep], -1)
        nll -= float(lp.gather(1, t[:, None]).sum())
        uni -= float(unigram[t].sum())
        n += int(keep.sum())
    return {"tokens": n, "ppl": math.exp(nll / n), "unigram_ppl": math.exp(uni / n)}


def evaluate_model_dir(model_dir: str | Path, shards: str | Path, variants=((None, None),), seq_len: int = 128,
                       rows: int = 64, backend: str = "cpu") -> list[dict]:
    """Perplexities of the model and of its quantized ``variants``: (bits, scheme) pairs,
    (None, None) the unquantized model (:func:`~glm_runtime.converters.quantize.quantize_scheme`)."""

    config, state = native.load(model_dir)
    tok = Tokenizer(Path(model_dir) / native.TOKENIZER, config)
    ids = SpecialIds.from_tokenizer(tok)
    held = TokenStream.open(shards, "heldout")
    uni = unigram_logprobs(TokenStream.open(shards, "train"), config.vocab_size)
    b = get_backend(backend, needs_graph=True)
    out = []
    for bits, scheme in variants:
        cfg, st = (config, state) if bits is None else quantize_scheme(config, state, bits, scheme)
        model = build_model(cfg, st, b)
        for name, obj in (("gmask", ObjectiveConfig(mask_share=0.0)),
                          ("mask", ObjectiveConfig(mask_share=1.0, pack=2))):
            r = perplexities(model, held, ids, obj, seq_len, rows, uni)
            out.append({"weights": "fp32" if bits is None else f"int{bits} {scheme}", "objective": name, **r})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--shards", required=True, help="the run's shards directory (train + heldout splits)")
    ap.add_argument("--bits", nargs="*", type=int, default=[8, 4], help="also evaluate these quantizations, in "
                    "every scheme of glmrt quantize")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64)
    a = ap.parse_args(argv)
    variants = [(None, None)] + [(b, s) for b in a.bits for s in SCHEMES]
    res = evaluate_model_dir(a.model_dir, a.shards, variants, a.seq_len, a.rows)
    print("| weights | objective | target tokens | model perplexity | unigram perplexity |")
    print("|---|---|---|---|---|")
    for r in res:
        print(f"| {r['weights']} | [{'gMASK' if r['objective'] == 'gmask' else 'MASK'}] | {r['tokens']} | "
              f"{r['ppl']:.1f} | {r['unigram_ppl']:.1f} |")


if __name__ == "__main__":
    main()
