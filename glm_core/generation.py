"""Token generation: prefill, then one token per step through a preallocated KV cache.

:class:`DecodeBatch` is the one decode step of the runtime: ``generate`` runs it for a
batch whose rows advance together, and the serving engine runs it for sequences that
start, advance and stop independently, each in its own row ("slot") of the cache. A step
allocates nothing: tokens, positions, write positions and the attention mask live in
buffers made once, and the step reads views of them (fixed shapes when asked: the whole
cache width and a fixed row count, what a captured CUDA graph needs). A batch may opt in to
running its fixed-shape steps as records made through the backend's capture hook
(:meth:`DecodeBatch.capture_with`).

Semantics follow transformers' ``generate`` so results can be compared token for token:
logits processing order is temperature, top-k, top-p; a row that emitted a stop token
keeps emitting the pad token; generation ends early when every row has stopped.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import GLMError
from .masks import DecodeState, decode_inputs, prefill_inputs


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


# top-p looks for its kept tokens among this many most likely ones first: a full sort of
# a GLM-4 vocabulary (151,552 logits) took 13 ms on the CPU, a top-1024 0.3 ms
TOP_P_CANDIDATES = 1024


def process_logits(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of [B, V] fp32 logits."""
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        logits = logits.masked_fill(~top_p_keep(logits, s.top_p), float("-inf"))
    return logits


def top_p_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [B, V]: the tokens nucleus filtering keeps, as transformers' ``TopPLogitsWarper``:
    a token stays when the tokens more likely than it hold less than ``top_p`` of the
    probability (so the most likely always stays). The kept tokens are the most likely
    ones: when the :data:`TOP_P_CANDIDATES` most likely hold ``top_p`` in every row, they
    are sorted alone; otherwise (a flat distribution) the whole vocabulary is."""
    probs = logits.softmax(-1)
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    top, order = torch.topk(probs, k, dim=-1)  # descending
    if k < probs.shape[-1] and not bool((top.sum(-1) >= top_p).all()):
        top, order = torch.sort(probs, dim=-1, descending=True)
    keep = (top.cumsum(-1) - top) < top_p
    keep[:, 0] = True
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, keep)


def sample(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V], drawn by inverting the cumulative distribution
    at one uniform number per row (torch.multinomial took 3 ms over a GLM-4 vocabulary on
    the CPU, this 0.3). The first token whose cumulative probability exceeds the draw is
    taken, so a token of probability 0 never is."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=gen, device=probs.device, dtype=probs.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # below the total, after rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def next_tokens(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    if not s.do_sample:
        return greedy(logits)
    return sample(process_logits(logits, s).softmax(-1), gen)


def host_array(logits: torch.Tensor):
    """``logits`` as a numpy array when they are fp32 in host memory (else None): the
    step's reductions over them are numpy's there (:func:`greedy`, :func:`check_finite`
    say why)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return None
    return (logits.detach() if logits.requires_grad else logits).numpy()  # a detach is a tensor call more


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row of [B, V] logits (the first, at a tie).

    In host memory this is numpy's argmax: torch's CPU argmax over the last dimension is a
    scalar loop, measured at 46 us over a 16K vocabulary and 394 us over GLM-4's 151,552
    against numpy's 3 and 24 us, a few percent of a small model's decode step. Both return
    the first maximal index."""
    a = host_array(logits)
    return logits.argmax(-1) if a is None else torch.from_numpy(a.argmax(-1))


def check_finite(logits: torch.Tensor, step: int) -> None:
    """Non-finite logits (NaN or inf weights, an overflow) must not become text: one line
    naming the step instead. The extremes are checked (a NaN or an inf shows in them): one
    reduction, ~10x cheaper than an elementwise test over a GLM-4 vocabulary.

    In host memory numpy reduces, on the calling thread. torch's reduction over a GLM-4
    vocabulary (151,552 logits) runs on torch's OpenMP threads, which keep spinning for a
    while after it and so take a core from the next step when that step computes in
    another thread pool (the onnx backend's): measured on 2 cores, the INT8 decode of 64
    tokens of the benchmark's GLM-4-vocabulary model took 289 ms after torch's reduction
    and 177 ms after numpy's."""
    a = host_array(logits)
    extremes = torch.aminmax(logits) if a is None else (a.min(), a.max())
    if not all(math.isfinite(float(x)) for x in extremes):
        raise GLMError(f"the model produced non-finite logits at generation step {step} (the weights contain "
                       "NaN/inf values, or the computation overflowed)")


def check_context(config, prompt_len: int, new_tokens: int) -> None:
    """Prompt plus new tokens must fit the model's positions, checked before any allocation."""
    limit = config.max_position_embeddings
    if prompt_len + new_tokens > limit:
        raise GLMError(f"the prompt ({prompt_len} tokens) plus max new tokens ({new_tokens}) is "
                       f"{prompt_len + new_tokens} positions, more than the model's {limit}")


class DecodeBatch:
    """The decode state of up to ``rows`` sequences sharing one KV cache of ``max_len``
    positions, row r holding sequence r (see the module docstring).

    Per row: the token to feed next, its position (1D, or 2D for ChatGLM-6B), the position
    increment, how many cache positions are written, and which of them are real (left
    padding of a ``generate`` batch is not). :meth:`prefill` runs a prompt (or a chunk of
    one) into some rows, :meth:`begin_decode` sets their next positions, and :meth:`step`
    feeds one token to each of rows 0..n-1 and returns the next logits.

    A step is two parts: :meth:`_feed` writes the tokens, keys and values at the rows'
    current lengths and computes the logits, without moving the lengths (running it twice
    is running it once, which is what lets a capture warm it up); then the lengths and
    positions advance. With :meth:`capture_with`, a fixed-shape step's first part is a
    replayed record.
    """

    def __init__(self, model, rows: int, max_len: int):
        self.model, self.rows, self.max_len = model, rows, max_len
        dev = model.device
        two_d = model.config.rope == "neox_2d"
        self.cache = model.new_cache(rows, max_len)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.next_pos = torch.zeros((rows, 2) if two_d else (rows,), dtype=torch.long, device=dev)
        self._pos_col = self.next_pos.unsqueeze(-1)  # the model's [rows, (2,) 1] positions: a view, made once
        self.inc = torch.ones_like(self.next_pos)
        self.length = torch.zeros(rows, dtype=torch.long, device=dev)
        self.real = torch.zeros(rows, max_len, dtype=torch.bool, device=dev)
        self._row_ids = torch.arange(rows, device=dev)
        self.host_length = [0] * rows  # the same lengths on the host: a step is sized without a sync
        self.aligned = False  # rows advance together (a generate batch): one slice write, no per-row index
        self.unpadded = False  # and none has padding: no mask at all
        self._capture: Callable | None = None  # the backend's capture hook, once opted in
        self._records: dict[int, Callable | None] = {}  # row count -> its record (None: the backend made none)

    def prefill(self, rows: slice, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, start: int = 0,
                real: torch.Tensor | None = None, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``ids`` [n, T] at cache positions ``start``.. of ``rows`` (a prompt, or a chunk
        of one); ``real`` [n, T] marks padding (default: none). Returns the model's logits."""
        cache = self.cache if rows == slice(0, self.rows) else self.cache.view(rows)
        logits = self.model(ids, pos, mask, cache=cache, start=start, logits_index=logits_index)
        T = ids.shape[1]
        self.real[rows, start:start + T] = True if real is None else real
        self.length[rows] = start + T
        for r in range(*rows.indices(self.rows)):
            self.host_length[r] = start + T
        return logits

    def begin_decode(self, rows: slice, state: DecodeState) -> None:
        """The rows' prompts are in: their next positions come from the prompt's state."""
        self.next_pos[rows] = state.next_pos
        self.inc[rows] = state.inc

    def capture_with(self, backend) -> None:
        """Opt in to recorded decode steps: from now on the first part of a fixed-shape step
        of ``n`` rows is a record made through ``backend.capture`` (:meth:`Backend.capture
        <glm_runtime.core.registry.backend.Backend.capture>`) at the first such step, one
        record per row count, replayed at every later one. The logits such a step returns
        are the record's output buffer: valid until the next step. A backend that does not
        capture leaves the steps as they are, with the same results."""
        self._capture = backend.capture
        self._records = {}

    @property
    def recorded_rows(self) -> list[int]:
        """The row counts whose fixed-shape step runs as a record (not as plain calls)."""
        return sorted(n for n, rec in self._records.items() if rec is not None)

    def step(self, n: int, tokens: torch.Tensor, fixed_shape: bool = False) -> torch.Tensor:
        """Feed ``tokens`` [n] to rows 0..n-1, each at its own next position, and return the
        logits [n, V]. ``fixed_shape`` attends over the whole cache (every step the same
        shapes) instead of the longest row's length."""
        if max(self.host_length[:n]) >= self.max_len:
            raise GLMError(f"the KV cache of {self.max_len} positions is full")
        if fixed_shape and self._capture is not None:
            logits = self._recorded(n, tokens)(tokens)
        else:
            logits = self._feed(n, tokens, fixed_shape)
        if n == self.rows:  # whole tensors: one call each (host work between steps is costly, see _feed)
            self.length += 1
            self.next_pos += self.inc
        else:
            self.length[:n] += 1
            self.next_pos[:n] += self.inc[:n]
        for r in range(n):
            self.host_length[r] += 1
        return logits

    def _recorded(self, n: int, tokens: torch.Tensor) -> Callable:
        feed = functools.partial(self._feed, n, fixed_shape=True)
        if n not in self._records:
            self._records[n] = self._capture(feed, (tokens,))
        return self._records[n] or feed

    def _feed(self, n: int, tokens: torch.Tensor, fixed_shape: bool) -> torch.Tensor:
        """The step's device work up to the logits: it reads and writes the batch's own
        buffers at the rows' current lengths and leaves the lengths alone (idempotent).

        Each tensor call here is paid again every step, and on a CPU whose caches the step's
        weights have just flushed it costs ~10 us (~1 us in a loop): a generate batch
        (aligned rows) feeds the tokens as they are, skips the mask's bookkeeping when it
        has no padding (it has no mask then), and reads the positions through a view made
        once. A fixed-shape step writes into the batch's own buffers, which a record reads."""
        lengths = self.host_length[:n]
        width = self.max_len if fixed_shape else max(lengths) + 1
        pos = self._pos_col if n == self.rows else self._pos_col[:n]
        if self.aligned and not fixed_shape:
            if not self.unpadded:
                self.real[:n, lengths[0]] = True  # one column: a slice write, not a per-row index
            ids, start = tokens.view(n, 1), lengths[0]
            mask = None if self.unpadded else self.real[:n, None, None, :width]
        else:
            self.tokens[:n, 0] = tokens
            self.real[self._row_ids[:n], self.length[:n]] = True
            ids, start, mask = self.tokens[:n], self.length[:n], self.real[:n, None, None, :width]
        logits = self.model(ids, pos, mask, cache=self.cache, start=start)
        return logits[:, -1]

    def reset(self, rows: slice) -> None:
        """Free ``rows`` for a new sequence (a serving slot)."""
        self.real[rows] = False
        self.length[rows] = 0
        for r in range(*rows.indices(self.rows)):
            self.host_length[r] = 0


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
    N = s.max_new_tokens
    dev = input_ids.device
    check_context(cfg, T, N)
    gen = None
    if s.do_sample:
        gen = torch.Generator(device=dev)
        gen.manual_seed(s.seed if s.seed is not None else torch.seed())
    # Stop tokens are tracked on the host: one read-back of the step's tokens (none without
    # stop tokens) instead of a few small device ops a step, each costing tens of us on a CPU
    # whose caches the step's weights have just flushed. A row that stopped has a device
    # mask from then on, which turns its later tokens into padding.
    stops = frozenset(s.stop_token_ids)
    done, stopped = [False] * B, None
    out = torch.full((B, T + N), pad_token_id, dtype=torch.long, device=dev)
    out[:, :T] = input_ids
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    last = torch.tensor([T - 1], device=dev)
    if use_cache:
        batch = DecodeBatch(model, B, T + N)
        pos, mask, state = prefill_inputs(cfg, input_ids, attention_mask)
        rows = slice(0, B)
        logits = batch.prefill(rows, input_ids, pos, mask, real=state.real, logits_index=last)[:, -1]
        batch.begin_decode(rows, state)
        batch.aligned, batch.unpadded = True, state.all_real
    for step in range(N):
        if not use_cache:  # recompute the whole sequence: the reference for the cached path
            pos, mask = full_inputs(cfg, input_ids, attention_mask, step)
            logits = model(out[:, :T + step], pos, mask, logits_index=last + step)[:, -1]
        if logits.dtype != torch.float32:
            logits = logits.float()
        check_finite(logits, step)
        tok = next_tokens(logits, s, gen)
        if stopped is not None:
            tok = tok.masked_fill(stopped, pad_token_id)
        out[:, T + step] = tok
        if stream is not None:
            stream(tok)
        if stops:
            now = [d or t in stops for d, t in zip(done, tok.tolist())]
            if all(now):
                return out[:, :T + step + 1]
            if now != done:
                done, stopped = now, torch.tensor(now, device=dev)
        if step == N - 1:
            return out[:, :T + step + 1]
        if use_cache:
            logits = batch.step(B, tok)
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
