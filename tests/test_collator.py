"""The GLM blank-infilling collator: the objective's layout, statistics, positions that match
what the runtime builds at inference (glm_runtime.core.masks), packing, and exact resumability."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from glm_runtime.core.masks import prefill_inputs
from glm_runtime.core.presets import preset
from glm_runtime.training.collator import IGNORE, Collator, ObjectiveConfig, SpecialIds
from glm_runtime.training.data import TokenStream, build_shards, read_documents, split_documents

V = 1000
END = 7  # the "sentence end" token of the synthetic stream
IDS = SpecialIds(mask=V, gmask=V + 1, smask=V + 2, sop=V + 3, eop=V + 4, pad=0, sentence_ends=frozenset({END}))


def stream(n=50_000, seed=0):
    """Distinct-looking ids (10..V) with a sentence end every 5-14 tokens."""
    rng = np.random.default_rng(seed)
    x = rng.integers(10, V, n)
    pos = 0
    while pos < n:
        pos += int(rng.integers(5, 15))
        if pos < n:
            x[pos] = END
    return TokenStream(x.astype(np.uint16), eod_id=2)


def cfg130b(**kw):
    return preset("tiny-glm-130b", vocab_size=V + 5, mask_token_id=V, gmask_token_id=V + 1, smask_token_id=V + 2,
                  sop_token_id=V + 3, eop_token_id=V + 4, eos_token_ids=[V + 4], **kw)


def split_row(b, r):
    """The packed samples of row r: (ids, targets, positions, mask) per segment."""
    seg = b.segment[r]
    out = []
    for s in sorted(set(seg.tolist()) - {-1}):
        i = (seg == s).nonzero().flatten()
        lo, hi = int(i[0]), int(i[-1]) + 1
        pos = b.position_ids[r][..., lo:hi]
        out.append((b.input_ids[r, lo:hi], b.targets[r, lo:hi], pos, b.mask[r, 0, lo:hi, lo:hi]))
    return out


def reconstruct(ids, tg, mask_id):
    """Original text of a blank-infilling sample: Part A with each mask token replaced by
    its span from Part B (spans in Part B are in shuffled order; each is [sop] + span)."""
    ids, tg = ids.tolist(), tg.tolist()
    ctx = ids.index(IDS.sop)
    part_a = ids[:ctx]
    spans, cur = [], None
    for i in range(ctx, len(ids)):
        if ids[i] == IDS.sop:
            cur = []
            spans.append(cur)
        if tg[i] != IDS.eop:
            cur.append(tg[i])
    return part_a, spans


def test_mask_rows_reconstruct_the_text_and_cover_15_percent():
    s = stream()
    col = Collator(s, 256, ObjectiveConfig(mask_share=1.0, pack=4, shuffle_spans=False), IDS, seed=1)
    offset, lengths, covered, total = 0, [], 0, 0
    for _ in range(20):
        b = col.next_batch(4)
        for r in range(4):
            assert b.objectives[r] == "mask"
            samples = split_row(b, r)
            assert len(samples) == 4 and all(len(x[0]) <= 64 for x in samples)
            for ids, tg, pos, m in samples:
                part_a, spans = reconstruct(ids, tg, IDS.mask)
                text = []
                it = iter(spans)
                for t in part_a:
                    text.extend(next(it) if t == IDS.mask else [t])
                n = len(text)
                assert text == s.take(offset, n).tolist()
                offset += n
                lengths += [len(x) for x in spans]
                k = sum(len(x) for x in spans)
                assert k >= round(0.15 * n) and k <= round(0.15 * n) + 39
                covered, total = covered + k, total + n
                # targets only on Part B, each span ends with eop
                ctx = ids.tolist().index(IDS.sop)
                assert (tg[:ctx] == IGNORE).all() and (tg[ctx:] != IGNORE).all()
                assert tg.tolist().count(IDS.eop) == len(spans)
    assert col.offset == offset
    # Poisson(3) clipped to >= 1 has mean 3 + P(0) * 1 = 3.0498; 1,000+ draws: std < 0.06
    assert abs(np.mean(lengths) - 3.0498) < 0.25
    assert 0.15 <= covered / total < 0.2


def test_objective_shares_and_gmask_lengths():
    col = Collator(stream(), 128, ObjectiveConfig(mask_share=0.3, pack=2), IDS, seed=2)
    kinds, fracs = [], []
    for _ in range(60):
        b = col.next_batch(8)
        kinds += b.objectives
        for r, k in enumerate(b.objectives):
            if k == "gmask":
                ids, tg, pos, m = split_row(b, r)[0]
                n = len(ids) - 2
                t = int((tg != IGNORE).sum()) - 1  # minus eop
                fracs.append(t / n)
                # positions 0..L-1, [gMASK] right before sop, context = prefix + [gMASK]
                assert torch.equal(pos, torch.arange(len(ids)))
                assert ids[n - t] == IDS.gmask and ids[n - t + 1] == IDS.sop
    share = kinds.count("mask") / len(kinds)
    assert abs(share - 0.3) < 0.07  # 480 rows: binomial std 0.021
    assert min(fracs) >= 0.5 - 1e-9 and max(fracs) <= 1.0
    assert abs(np.mean(fracs) - 0.75) < 0.03  # U[0.5, 1]: mean 0.75, std of the mean ~0.006


@pytest.mark.parametrize("positions", ["1d", "2d"])
@pytest.mark.parametrize("share", [1.0, 0.0])
def test_positions_and_mask_match_inference(positions, share):
    """The first span of every sample, seen as a prompt ``Part A + [sop] + span``, gets from
    glm_runtime.core.masks (what generation uses) exactly the collator's positions and mask."""
    rope = "neox_2d" if positions == "2d" else "neox"
    config = cfg130b(rope=rope, rope_dim=24 if positions == "1d" else 24, head_dim=24)
    col = Collator(stream(), 128, ObjectiveConfig(mask_share=share, positions=positions, pack=2,
                                                  shuffle_spans=False), IDS, seed=3)
    checked = 0
    for _ in range(3):
        b = col.next_batch(4)
        for r in range(4):
            for ids, tg, pos, m in split_row(b, r):
                lst = ids.tolist()
                ctx = lst.index(IDS.sop)
                end = lst.index(IDS.sop, ctx + 1) if IDS.sop in lst[ctx + 1:] else len(lst)
                prompt = ids[None, :end]
                p_inf, m_inf, _ = prefill_inputs(config, prompt, None)
                assert torch.equal(p_inf[0], pos[..., :end]), (positions, share)
                assert torch.equal(m_inf[0, 0], m[:end, :end])
                checked += 1
    assert checked >= 12


def test_packed_samples_do_not_see_each_other():
    col = Collator(stream(), 128, ObjectiveConfig(mask_share=1.0, pack=4), IDS, seed=4)
    b = col.next_batch(2)
    seg = b.segment[0]
    same = seg[:, None] == seg[None, :]
    off = b.mask[0, 0] & ~same
    assert not off.any()
    assert b.mask[0, 0].diagonal().all()  # padding rows attend to themselves only (no empty softmax)
    # Part B is causal: a span token never sees a later token of its sample
    ids, tg, pos, m = split_row(b, 0)[0]
    ctx = ids.tolist().index(IDS.sop)
    assert not torch.triu(m[ctx:, ctx:], 1).any()
    assert m[:, :ctx].all()  # everyone sees Part A


def test_smask_spans_are_whole_sentences():
    col = Collator(stream(), 128, ObjectiveConfig(mask_share=0.0, smask_share=1.0, pack=2, shuffle_spans=False),
                   IDS, seed=5)
    seen = 0
    for _ in range(5):
        b = col.next_batch(4)
        for r in range(4):
            for ids, tg, pos, m in split_row(b, r):
                if IDS.smask not in ids.tolist():
                    continue
                part_a, spans = reconstruct(ids, tg, IDS.smask)
                for sp, i in zip(spans, [i for i, t in enumerate(part_a) if t == IDS.smask]):
                    assert sp[-1] == END or i == len(part_a) - 1  # a span ends a sentence
                    assert i == 0 or part_a[i - 1] in (END, IDS.smask)  # and starts one
                    seen += 1
    assert seen > 10


def test_causal_objective_is_next_token_prediction():
    s = stream()
    col = Collator(s, 64, ObjectiveConfig(kind="causal"), IDS, seed=6)
    b = col.next_batch(2)
    x = s.take(0, 63).tolist()
    assert b.input_ids[0, :2].tolist() == [IDS.gmask, IDS.sop]
    assert b.input_ids[0, 2:].tolist() == x[:62]
    assert b.targets[0, 1:].tolist() == x[:63] and b.targets[0, 0] == IGNORE
    assert torch.equal(b.mask[0, 0], torch.tril(torch.ones(64, 64, dtype=torch.bool)))
    assert b.input_ids[1, 2] == x[62]  # the next row goes on where this one stopped


def test_state_restores_the_exact_batches():
    a = Collator(stream(), 128, ObjectiveConfig(smask_share=0.2), IDS, seed=7)
    for _ in range(3):
        a.next_batch(4)
    st = a.state_dict()
    want = [a.next_batch(4) for _ in range(3)]
    b = Collator(stream(), 128, ObjectiveConfig(smask_share=0.2), IDS, seed=999)
    b.load_state_dict(st)
    got = [b.next_batch(4) for _ in range(3)]
    for x, y in zip(want, got):
        for f in ("input_ids", "position_ids", "mask", "targets", "segment"):
            assert torch.equal(getattr(x, f), getattr(y, f))


def test_heldout_split_is_stable_and_disjoint(tmp_path):
    from train_helpers import tiny_corpus, tiny_tokenizer

    from glm_runtime.core.tokenizer import Tokenizer
    from glm_runtime.training.data import corpus_files, read_index

    corpus = tiny_corpus(tmp_path)
    docs = read_documents(corpus_files(corpus))
    tr, he = split_documents(docs, 8)
    assert he and not set(tr) & set(he) and len(tr) + len(he) == len(docs)
    assert split_documents(list(reversed(docs)), 8)[1] == list(reversed(he))  # per document, order-free
    tok = Tokenizer(tiny_tokenizer(tmp_path, corpus))
    out = build_shards(corpus_files(corpus), tok, tmp_path / "shards", 8, progress=False)
    idx = read_index(out)
    assert idx["splits"]["heldout"]["documents"] == len(he)
    s = TokenStream.open(out, "train")
    assert len(s) == sum(len(tok.sp.encode(d)) + 1 for d in tr)
    first = s.take(0, 20000).tolist()
    first_doc = first[:first.index(s.eod_id)]
    assert tok.sp.encode(tok.sp.decode(first_doc)) == first_doc and tok.sp.decode(first_doc) in tr


def test_documents_by_blank_line_or_by_line(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("one\ntwo lines\n\nthree\n")
    b = tmp_path / "b.txt"
    b.write_text("first paragraph\nsecond paragraph\n")  # no blank line: one document per line
    assert read_documents([a, b]) == ["one\ntwo lines", "three", "first paragraph", "second paragraph"]

