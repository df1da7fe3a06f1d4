"""Blank infilling: fill the [MASK] / [sMASK] / [gMASK] blanks of a text, as GLM-130B's
``generate.py`` does.

1. The text is tokenised with the mask markers kept as their ids. With no mask, a
   [gMASK] is appended. GLM-130B (1D positions) appends its text ``</s>`` when the text
   does not end with a mask; ChatGLM-6B (2D positions) appends [gMASK] when the text has
   none, as its tokenizer's ``[gMASK] <sop>`` suffix does.
2. The mask kind to fill is [MASK] if present, else [sMASK], else [gMASK]. While one of
   that kind remains: the sequence plus ``<sop>`` is the prompt (the context is attended
   bidirectionally, the span causally; the span's positions are the blank's position for
   [MASK]/[sMASK] and continue after the context for [gMASK] — :mod:`glm_runtime.core.masks`
   builds both from the ids), decoding stops at ``<eop>`` or an eos, and the first
   remaining mask token is replaced by the generated span. Several [MASK]s are thus
   filled left to right, each seeing the spans filled before it; the KV cache is rebuilt
   for each blank.
"""
from __future__ import annotations

from .errors import GLMError


def fill_blanks(m, tok, text: str, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> str:
    """The text with every blank of the chosen kind filled (special tokens dropped).

    ``m`` is a :class:`glm_runtime.api.GLM` of a prefix-attention family, ``tok`` its
    :class:`glm_runtime.core.tokenizer.Tokenizer`.
    """
    ids, kind = infill_prompt(m.config, tok, text)
    stops = sorted({m.config.eop_token_id, *m.config.eos_token_ids} - {None})
    sop = m.config.sop_token_id
    for step in range(ids.count(kind)):
        where = ids.index(kind)
        prompt = ids + [sop]
        out = m.generate([prompt], max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=None if seed is None else seed + step,
                         stop_token_ids=stops)[0, len(prompt):].tolist()
        span = []
        for t in out:
            if t in stops:
                break
            span.append(t)
        ids = ids[:where] + span + ids[where + 1:]
    return tok.decode(ids)


def infill_prompt(config, tok, text: str) -> tuple[list[int], int]:
    """(ids with the mask tokens and the family's suffix, the mask kind to fill)."""
    if config.attention != "prefix":
        raise GLMError(f"{config.family} is a causal model: blank infilling needs GLM-130B or ChatGLM-6B")
    mask, smask, gmask = config.mask_token_id, config.smask_token_id, config.gmask_token_id
    if None in (mask, gmask, config.sop_token_id):
        raise GLMError("the model config lacks the [MASK]/[gMASK]/<sop> ids needed for blank infilling")
    ids = tok.encode(text)
    if not ids:
        raise GLMError("the text encodes to no tokens")
    marks = {mask, smask, gmask}
    if config.rope == "neox_2d":
        if gmask not in ids:
            ids.append(gmask)
    else:
        if not marks & set(ids):
            ids.append(gmask)
        if ids[-1] not in marks and tok.eos_id is not None:
            ids.append(tok.eos_id)
    kind = mask if mask in ids else smask if smask is not None and smask in ids else gmask
    return ids, kind
