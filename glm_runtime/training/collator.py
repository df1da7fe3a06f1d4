"""The GLM pre-training objectives as batches: autoregressive blank infilling and causal LM.

Blank infilling (GLM, GLM-130B, ChatGLM-6B). A sample's text ``x`` is split into Part A,
the text with each chosen span replaced by one mask token, and Part B, each span as
``[sop] + span`` predicting ``span + [eop]``; the loss is on Part B only. Part A attends
bidirectionally to itself, Part B sees all of Part A and is causal in itself (the prefix
mask of glm_runtime.core.masks). Each row of a batch draws one objective, as GLM-130B did:

* ``[MASK]`` (share ``mask_share``, 30 % for GLM-130B): spans with Poisson(lambda = 3)
  lengths (clipped to 1..``max_span``) until they cover ``mask_ratio`` (15 %) of the text,
  placed uniformly without touching each other; such rows pack ``pack`` short samples
  (GLM-130B: four 512-token samples in a 2,048 context);
* ``[sMASK]`` (share ``smask_share``, optional): whole sentences until 15 % is covered;
* ``[gMASK]`` (the rest): a prefix is kept as context and the suffix, of uniformly drawn
  length ``U[gmask_min_ratio, gmask_max_ratio]`` of the text, is generated.

Part B spans are shuffled (``shuffle_spans``). Positions are those the runtime uses at
inference (glm_runtime.core.masks): ``1d`` (GLM-130B) gives Part A ``0..`` and a [MASK]/[sMASK]
span the position of its mask token, a [gMASK] suffix continuing positions; ``2d``
(ChatGLM-6B) gives (mask position, block position 1, 2, ...) to every span token.

Causal LM (ChatGLM2/3, GLM-4): ``[gMASK] sop`` + text, next-token loss on the text,
positions ``0..``, causal mask.

Determinism: every random choice comes from one numpy PCG64 generator whose state, with the
read offset into the token stream, is the collator's state (``state_dict``). Restoring it
reproduces the following batches exactly, and every rank (pipeline stage, tensor shard,
data shard) that builds the batch from the same state sees the same samples.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from glm_runtime.core.errors import GLMError
from glm_runtime.core.schema import FLAG, check_fields, integer, number, one_of, spec

from .data import TokenStream

IGNORE = -100
_SHARE = number(0, 1)
SEQ_LEN = integer(16, 2**20)  # tokens per row: a sample needs room for its spans


@dataclass
class ObjectiveConfig:
    kind: str = spec(one_of("glm", "causal"), "glm")  # "glm" blank infilling | "causal"
    positions: str = spec(one_of("1d", "2d"), "1d")  # "1d" (GLM-130B) | "2d" (ChatGLM-6B)
    mask_share: float = spec(_SHARE, 0.3)
    smask_share: float = spec(_SHARE, 0.0)
    mask_ratio: float = spec(number(0, 1, lo_open=True, hi_open=True), 0.15)
    poisson_lambda: float = spec(number(0, lo_open=True), 3.0)
    max_span: int = spec(integer(1, 2**20), 39)
    gmask_min_ratio: float = spec(_SHARE, 0.5)
    gmask_max_ratio: float = spec(_SHARE, 1.0)
    shuffle_spans: bool = spec(FLAG, True)
    pack: int = spec(integer(1, 1024), 4)

    def __post_init__(self):
        check_fields(self, "objective")
        bad = None
        if self.kind == "causal" and self.positions == "2d":
            bad = "the causal objective uses 1d positions"
        elif self.mask_share + self.smask_share > 1:
            bad = f"mask_share + smask_share = {self.mask_share + self.smask_share:g}: must be <= 1"
        elif self.gmask_min_ratio > self.gmask_max_ratio:
            bad = f"gmask_min_ratio={self.gmask_min_ratio:g} exceeds gmask_max_ratio={self.gmask_max_ratio:g}"
        if bad:
            raise GLMError(f"invalid objective: {bad}")


@dataclass
class SpecialIds:
    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int
    pad: int
    sentence_ends: frozenset = field(default_factory=frozenset)  # ids that end a sentence ([sMASK])

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        ends = set()
        for i in range(tok.sp.get_piece_size()):
            p = tok.sp.id_to_piece(i)
            if p.rstrip() and p.rstrip()[-1] in ".?!;。？！；\n":
                ends.add(i)
        if tok.eos_id is not None:
            ends.add(tok.eos_id)
        s = tok.special
        return cls(s["mask"], s["gmask"], s["smask"], s["sop"], s["eop"], tok.pad_id, frozenset(ends))


@dataclass
class Sample:
    ids: list
    targets: list
    pos: list
    block: list
    ctx: int  # Part A length (0 = causal)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] or [B, 2, T] long
    mask: torch.Tensor  # [B, 1, T, T] bool, True = may attend
    targets: torch.Tensor  # [B, T] long, IGNORE where there is no loss
    segment: torch.Tensor  # [B, T] long: packed sample index in the row, -1 on padding
    objectives: list  # per row: "mask" | "smask" | "gmask" | "causal"

    def to(self, device) -> "Batch":
        """The batch on ``device`` (the collator builds it on the host)."""
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.mask.to(device),
                     self.targets.to(device), self.segment.to(device), self.objectives)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens (what tokens/s counts)."""
        return int((self.segment >= 0).sum())


class Collator:
    """Builds batches of ``seq_len`` tokens from a :class:`TokenStream`."""

    def __init__(self, stream: TokenStream, seq_len: int, objective: ObjectiveConfig, ids: SpecialIds,
                 seed: int = 0):
        SEQ_LEN.check("seq_len", seq_len)
        if objective.kind == "glm" and objective.mask_share + objective.smask_share > 0 \
                and seq_len // objective.pack < 16:
            raise GLMError(f"seq_len {seq_len} / pack {objective.pack} leaves fewer than 16 tokens per sample")
        self.stream, self.seq_len, self.obj, self.ids = stream, seq_len, objective, ids
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.offset = 0
        self.rows = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"offset": self.offset, "rows": self.rows, "rng": self.rng.bit_generator.state,
                "seq_len": self.seq_len, "objective": asdict(self.obj)}

    def load_state_dict(self, s: dict) -> None:
        if s["seq_len"] != self.seq_len or s["objective"] != asdict(self.obj):
            raise GLMError("the checkpoint's data pipeline (seq_len/objective) differs from this run's config")
        self.offset, self.rows = int(s["offset"]), int(s["rows"])
        self.rng.bit_generator.state = s["rng"]

    # ---------------------------------------------------------------- samples
    def _read(self, n: int) -> list:
        x = self.stream.take(self.offset, n).tolist()
        self.offset += n
        return x

    def _blank_layout(self, x: list, spans: list, mask_id: int) -> Sample:
        """Part A with each (start, length) span replaced by ``mask_id``; Part B spans."""
        a, mask_pos, prev = [], [], 0
        for s, ln in spans:
            a.extend(x[prev:s])
            mask_pos.append(len(a))
            a.append(mask_id)
            prev = s + ln
        a.extend(x[prev:])
        order = list(range(len(spans)))
        if self.obj.shuffle_spans:
            order = [int(i) for i in self.rng.permutation(len(spans))]
        ids, tg, pos, blk = list(a), [IGNORE] * len(a), list(range(len(a))), [0] * len(a)
        for i in order:
            s, ln = spans[i]
            span = x[s:s + ln]
            ids += [self.ids.sop] + span
            tg += span + [self.ids.eop]
            pos += [mask_pos[i]] * (ln + 1)
            blk += list(range(1, ln + 2))
        return Sample(ids, tg, pos, blk, len(a))

    def _mask_sample(self, slot: int) -> Sample:
        o = self.obj
        draws = np.clip(self.rng.poisson(o.poisson_lambda, size=64), 1, o.max_span).tolist()
        cum = np.cumsum(draws)
        for n in range(slot - 2, 1, -1):
            k = int(np.searchsorted(cum, max(1, round(o.mask_ratio * n)))) + 1
            k = min(k, len(draws))
            m = int(cum[k - 1])
            if n + 2 * k <= slot and n - m + 1 >= k:
                break
        else:
            raise GLMError(f"sample slot of {slot} tokens is too short for [MASK] spans")
        lengths = draws[:k]
        gaps = np.sort(self.rng.choice(n - m + 1, size=k, replace=False)).tolist()
        spans, used = [], 0
        for g, ln in zip(gaps, lengths):
            spans.append((g + used, ln))
            used += ln
        return self._blank_layout(self._read(n), spans, self.ids.mask)

    def _smask_sample(self, slot: int) -> Sample:
        n = max(2, int(slot * 0.8))
        x = self.stream.take(self.offset, n).tolist()
        ends = [i for i, t in enumerate(x) if t in self.ids.sentence_ends]
        bounds = [0] + [e + 1 for e in ends if e + 1 < n] + [n]
        sents = [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]
        if len(sents) < 2:
            return self._mask_sample(slot)
        self.offset += n
        chosen, covered = [], 0
        for i in self.rng.permutation(len(sents)).tolist():
            if covered >= self.obj.mask_ratio * n or len(chosen) == len(sents) - 1:
                break
            if n + 2 * (len(chosen) + 1) > slot:
                break
            chosen.append(sents[i])
            covered += sents[i][1]
        return self._blank_layout(x, sorted(chosen), self.ids.smask)

    def _gmask_sample(self, slot: int) -> Sample:
        o = self.obj
        n = slot - 2
        lo = max(1, int(np.ceil(o.gmask_min_ratio * n)))
        hi = max(lo, min(n - 1, int(o.gmask_max_ratio * n)))
        t = int(self.rng.integers(lo, hi + 1))
        x = self._read(n)
        p = n - t
        a = x[:p] + [self.ids.gmask]
        ctx = len(a)
        ids = a + [self.ids.sop] + x[p:]
        tg = [IGNORE] * ctx + x[p:] + [self.ids.eop]
        if o.positions == "2d":
            pos = list(range(ctx)) + [ctx - 1] * (t + 1)
            blk = [0] * ctx + list(range(1, t + 2))
        else:
            pos, blk = list(range(ctx + t + 1)), [0] * (ctx + t + 1)
        return Sample(ids, tg, pos, blk, ctx)

    def _causal_sample(self, slot: int) -> Sample:
        n = slot - 2
        x = self.stream.take(self.offset, n + 1).tolist()
        self.offset += n
        ids = [self.ids.gmask, self.ids.sop] + x[:n]
        return Sample(ids, [IGNORE] + x, list(range(slot)), [0] * slot, 0)

    # ------------------------------------------------------------------ rows
    def _row(self):
        o, T = self.obj, self.seq_len
        if o.kind == "causal":
            kind, samples = "causal", [self._causal_sample(T)]
        else:
            u = float(self.rng.random())
            if u < o.mask_share:
                kind, samples = "mask", [self._mask_sample(T // o.pack) for _ in range(o.pack)]
            elif u < o.mask_share + o.smask_share:
                kind, samples = "smask", [self._smask_sample(T // o.pack) for _ in range(o.pack)]
            else:
                kind, samples = "gmask", [self._gmask_sample(T)]
        self.rows += 1
        return kind, samples

    def next_batch(self, batch_size: int) -> Batch:
        T, B = self.seq_len, batch_size
        ids = torch.full((B, T), self.ids.pad, dtype=torch.long)
        tg = torch.full((B, T), IGNORE, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        blk = torch.zeros(B, T, dtype=torch.long)
        seg = torch.full((B, T), -1, dtype=torch.long)
        part_a = torch.zeros(B, T, dtype=torch.bool)
        kinds = []
        for b in range(B):
            kind, samples = self._row()
            kinds.append(kind)
            slot = T // len(samples)
            for j, s in enumerate(samples):
                at, n = j * slot, len(s.ids)
                assert n <= slot, "sample longer than its slot"
                ids[b, at:at + n] = torch.tensor(s.ids)
                tg[b, at:at + n] = torch.tensor(s.targets)
                pos[b, at:at + n] = torch.tensor(s.pos)
                blk[b, at:at + n] = torch.tensor(s.block)
                seg[b, at:at + n] = j
                part_a[b, at:at + s.ctx] = True
        idx = torch.arange(T)
        causal = idx[None, :] <= idx[:, None]
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        mask = same & (part_a[:, None, :] | causal[None])
        mask.diagonal(dim1=1, dim2=2).fill_(True)  # padding attends to itself: no empty softmax row
        position_ids = torch.stack((pos, blk), 1) if self.obj.positions == "2d" else pos
        return Batch(ids, position_ids, mask[:, None], tg, seg, kinds)
