"""Weight-only INT8/INT4 against fp32, for every family and both schemes of ``glmrt quantize``.

Two kinds of model:

* the bundled trained model (``glm-tiny``) on a few blank-infilling prompts from its
  corpus: the one model here whose greedy text means something;
* each family's tiny preset with the conformance kit's random weights (320-token vocabulary,
  output projection scaled so that logits spread over several units), prompted with the
  kit's prompt: what quantization does to each family's graph (2D RoPE, prefix masks,
  sandwich norms, GQA ...).

For each (model, scheme, bits) the fp32 model generates 32 greedy tokens; then

* ``logit_err``: max |logit_q - logit_fp32| over the prompt and the generated tokens
  (teacher-forced on fp32's tokens), relative to the range of fp32's logits;
* ``top1``: how often the quantized model's argmax equals fp32's at those positions;
* ``greedy``: how many of its own 32 free-running greedy tokens equal fp32's before the
  first difference (after which the texts legitimately part).

Perplexity on held-out text is in ``glm_runtime.training.evaluate`` (and its bounds in the
tests); this script is the per-family report. Writes docs/quant-quality.json.

    python benchmarks/quant_quality.py [--tokens 32]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glm_runtime import disable_torch_device_autoload  # noqa: E402

disable_torch_device_autoload()

from glm_runtime.api import GLM  # noqa: E402
from glm_runtime.conformance.model_check import FAMILIES, kit_config, kit_prompt, kit_state  # noqa: E402
from glm_runtime.converters import native  # noqa: E402
from glm_runtime.converters.quantize import SCHEMES, quantize_scheme  # noqa: E402
from glm_runtime.core.assets import default_model_dir  # noqa: E402
from glm_runtime.core.build import build_model  # noqa: E402
from glm_runtime.core.infilling import infill_prompt  # noqa: E402
from glm_runtime.core.registry import get_backend  # noqa: E402
from glm_runtime.core.tokenizer import Tokenizer  # noqa: E402

BUNDLED_PROMPTS = (
    "Beware of the dog. [gMASK]",
    "The function returns a new list containing [MASK] of the original list.",
    "A journey of a thousand miles begins with [MASK].",
    "Python's standard library [gMASK]",
)


def compare(config, state, prompts, bits: int, scheme: str, tokens: int, backend) -> dict:
    ref = GLM(build_model(config, state, backend), backend)
    qc, qs = quantize_scheme(config, state, bits, scheme)
    q = GLM(build_model(qc, qs, backend), backend)
    worst = top1 = n = 0.0
    greedy = []
    for ids in prompts:
        ids = torch.tensor([ids])
        out = ref.generate(ids, max_new_tokens=tokens, stop_token_ids=[])
        lr, lq = ref(out)[0], q(out)[0]
        worst = max(worst, float((lq - lr).abs().max() / (lr.max() - lr.min())))
        span = slice(ids.shape[1] - 1, out.shape[1] - 1)  # positions that chose a generated token
        top1 += float((lq[span].argmax(-1) == lr[span].argmax(-1)).sum())
        n += out.shape[1] - ids.shape[1]
        mine = q.generate(ids, max_new_tokens=tokens, stop_token_ids=[])[0, ids.shape[1]:]
        diff = (mine != out[0, ids.shape[1]:]).nonzero()
        greedy.append(int(diff[0]) if len(diff) else tokens)
    return {"bits": bits, "scheme": scheme, "logit_err": worst, "top1": top1 / n,
            "greedy": sum(greedy) / len(greedy), "of": tokens}


def models():
    """(name, float config, float state, prompts as id lists)."""
    d = default_model_dir()
    config, state = native.load(d)
    tok = Tokenizer(Path(d) / native.TOKENIZER, config)
    prompts = []
    for text in BUNDLED_PROMPTS:
        ids, _ = infill_prompt(config, tok, text)
        prompts.append(ids + [config.sop_token_id])
    yield "glm-tiny (trained)", config, state, prompts
    for family in FAMILIES + ("tiny-glm-4",):
        c = kit_config(family)
        ids, am = kit_prompt(c)
        yield f"{family} (random)", c, kit_state(c), [ids[0].tolist()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "docs" / "quant-quality.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    backend = get_backend("cpu")
    rows = []
    print(f"{'model':28} {'weights':16} {'logit err':>10} {'top-1':>7} {'greedy':>8}")
    for name, config, state, prompts in models():
        for scheme in SCHEMES:
            for bits in (8, 4):
                r = {"model": name, **compare(config, state, prompts, bits, scheme, args.tokens, backend)}
                rows.append(r)
                print(f"{name:28} {f'INT{bits} {scheme}':16} {r['logit_err']:>9.2%} {r['top1']:>7.1%} "
                      f"{r['greedy']:>5.1f}/{r['of']}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
