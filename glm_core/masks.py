"""Attention masks and position ids, built from the token ids as each family's code does.

Users pass only ``input_ids`` and the usual padding mask (1 = real token, left padding);
the family's own masks and positions come from here.

* causal families (ChatGLM2/3, GLM-4): positions ``0..n-1`` over the real tokens, pads 0.
* prefix families (GLM-130B, ChatGLM-6B; blank infilling): with ``ctx`` the index of
  ``<sop>`` in the unpadded row (the whole row if absent), token i may attend to j when
  ``j < ctx or j <= i`` (bidirectional context, causal span).

  - 1D positions (GLM-130B): context ``0..ctx-1``; from ``<sop>`` on, the position of the
    first [MASK] (or [sMASK]) when the context holds one, else continuing ``ctx, ctx+1..``.
  - 2D positions (ChatGLM-6B, as its tokenizer builds them): first row ``0..ctx-1`` then
    the mask position (first [MASK] if present, else first [gMASK]); second row (block
    position) 0 over the context, then ``1, 2, ...`` from ``<sop>``. Each generated token
    repeats the last first-row id and increments the block id.

Every query row may attend at least to itself, so pad rows never produce NaN (their
outputs are ignored).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GLMConfig


@dataclass
class DecodeState:
    """What a decode step needs: which cached positions are real, and the next position."""

    real: torch.Tensor  # bool [B, Tk]
    next_pos: torch.Tensor  # long [B] or [B, 2]
    inc: torch.Tensor  # long, same shape as next_pos
    all_real: bool


def _first(ids: torch.Tensor, token: int | None) -> int | None:
    if token is None:
        return None
    hit = (ids == token).nonzero()
    return int(hit[0, 0]) if len(hit) else None


def prefill_inputs(config: GLMConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """(position_ids, mask [B, 1, T, T] bool, DecodeState) for a whole prompt."""
    B, T = input_ids.shape
    dev = input_ids.device
    real = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
    idx = torch.arange(T, device=dev)
    causal = idx[None, :] <= idx[:, None]  # [T, T]
    two_d = config.rope == "neox_2d"

    if config.attention == "causal":
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)
        allowed = causal[None] & real[:, None, :]
        next_pos = real.long().sum(-1)
        inc = torch.ones_like(next_pos)
    else:
        pos = torch.zeros(B, 2, T, dtype=torch.long, device=dev) if two_d else torch.zeros(B, T, dtype=torch.long,
                                                                                           device=dev)
        allowed = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
        next_pos = torch.zeros(B, 2, dtype=torch.long, device=dev) if two_d else torch.zeros(B, dtype=torch.long,
                                                                                            device=dev)
        inc = torch.tensor([0, 1] if two_d else [1], device=dev).expand_as(next_pos).clone()
        for b in range(B):
            start = int(real[b].long().argmax()) if bool(real[b].any()) else T  # left pads
            ids = input_ids[b, start:]
            n = T - start
            sop = _first(ids, config.sop_token_id)
            ctx = n if sop is None else sop
            r = torch.arange(n, device=dev)
            allowed[b, start:, start:] = (r[None, :] < ctx) | (r[None, :] <= r[:, None])
            if two_d:
                m = _first(ids, config.mask_token_id)
                m = _first(ids, config.gmask_token_id) if m is None else m
                m = ctx if m is None else m
                pos[b, 0, start:] = torch.where(r < ctx, r, torch.full_like(r, m))
                pos[b, 1, start:] = torch.where(r < ctx, torch.zeros_like(r), r - ctx + 1)
                # HF ChatGLM-6B's generate appends (last position, last block + 1): the mask
                # position after <sop>, the last context position when there is no <sop>.
                next_pos[b, 0], next_pos[b, 1] = pos[b, 0, -1], n - ctx + 1
            else:
                m = _first(ids[:ctx], config.mask_token_id)
                m = _first(ids[:ctx], config.smask_token_id) if m is None else m
                if m is None:
                    pos[b, start:] = r
                    next_pos[b] = n
                else:
                    pos[b, start:] = torch.where(r < ctx, r, torch.full_like(r, m))
                    next_pos[b], inc[b] = m, 0
        allowed &= real[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool, device=dev)[None]
    state = DecodeState(real=real, next_pos=next_pos, inc=inc, all_real=bool(real.all()))
    return pos, allowed[:, None], state


def decode_inputs(state: DecodeState):
    """(position_ids [B, 1] or [B, 2, 1], mask [B, 1, 1, Tk] or None) for one new token per
    row, and advance the state. Generated tokens follow the context, so they may attend to
    every real token before them."""
    B = state.real.shape[0]
    pos = state.next_pos.unsqueeze(-1)
    state.real = torch.cat((state.real, torch.ones(B, 1, dtype=torch.bool, device=state.real.device)), 1)
    state.next_pos = state.next_pos + state.inc
    mask = None if state.all_real else state.real[:, None, None, :]
    return pos, mask
