"""Token generation: prefill, then one token per step through a preallocated KV cache.

Semantics follow transformers' ``generate`` so results can be compared token for token:
logits processing order is temperature, top-k, top-p; a row that emitted a stop token
keeps emitting the pad token; generation ends early when every row has stopped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .masks import decode_inputs, prefill_inputs


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


def process_logits(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of [B, V] fp32 logits."""
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - s.top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    if not s.do_sample:
        return logits.argmax(-1)
    probs = process_logits(logits, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s: SamplingConfig,
             pad_token_id: int, use_cache: bool = True,
             stream: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Return [B, T + n] ids, n <= max_new_tokens. ``model`` is a :class:`GLMModel` or
    anything with its forward signature, ``config`` and ``new_cache``.

    ``stream`` is called with the [B] tensor of new tokens after every step.
    """
    cfg = model.config
    B, T = input_ids.shape
    dev = input_ids.device
    gen = None
    if s.do_sample:
        gen = torch.Generator(device=dev)
        gen.manual_seed(s.seed if s.seed is not None else torch.seed())
    stops = torch.tensor(sorted(set(s.stop_token_ids)), dtype=torch.long, device=dev)
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    out = input_ids
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    if use_cache:
        cache = model.new_cache(B, T + s.max_new_tokens)
        pos, mask, state = prefill_inputs(cfg, input_ids, attention_mask)
        last = torch.tensor([T - 1], device=dev)
        logits = model(input_ids, pos, mask, cache=cache, start=0, logits_index=last)[:, -1].float()
    for step in range(s.max_new_tokens):
        if not use_cache:  # recompute the whole sequence: the reference for the cached path
            pos, mask = full_inputs(cfg, input_ids, attention_mask, out.shape[1] - T)
            last = torch.tensor([out.shape[1] - 1], device=dev)
            logits = model(out, pos, mask, logits_index=last)[:, -1].float()
        tok = next_tokens(logits, s, gen)
        tok = torch.where(unfinished, tok, torch.full_like(tok, pad_token_id))
        out = torch.cat((out, tok[:, None]), 1)
        if stream is not None:
            stream(tok)
        if len(stops):
            unfinished &= ~torch.isin(tok, stops)
        if not bool(unfinished.any()) or step == s.max_new_tokens - 1:
            break
        if use_cache:
            pos, mask = decode_inputs(state)
            logits = model(tok[:, None], pos, mask, cache=cache, start=T + step)[:, -1].float()
    return out


def full_inputs(cfg, prompt, attention_mask, n_new):
    """Positions and mask for prompt + n_new generated tokens, exactly as the cached path
    sees them (for prefix families the generated tokens extend the blank: they are never
    context, even when the prompt has no <sop>)."""
    pos, mask, state = prefill_inputs(cfg, prompt, attention_mask)
    B, T = prompt.shape
    total = T + n_new
    full = torch.zeros(B, 1, total, total, dtype=torch.bool, device=prompt.device)
    full[:, :, :T, :T] = mask
    poss = [pos]
    for i in range(n_new):
        p, m = decode_inputs(state)
        poss.append(p)
        row = state.real[:, None, :] if m is None else m[:, 0]
        full[:, :, T + i, :T + i + 1] = row
    return torch.cat(poss, -1), full
