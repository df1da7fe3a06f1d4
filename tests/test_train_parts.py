"""Parts of the training stack against their definitions: schedules, clipping, DeepNorm
initialisation, the embedding gradient shrink, micro-batching, monitoring, the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import tiny_config, tiny_corpus, tiny_tokenizer

from glm_runtime.cli.main import main as glmrt
from glm_runtime.core.errors import GLMError
from glm_runtime.core.model import GLMModel
from glm_runtime.core.ops import OpTable
from glm_runtime.core.presets import preset
from glm_runtime.core.registry import get_backend
from glm_runtime.training.optim import OptimConfig, batch_size_at, clip_grads, lr_at, param_groups
from glm_runtime.training.run import prepare
from glm_runtime.training.stability import deepnorm_state, shrink_embedding_gradient


def small130b(**kw):
    return preset("tiny-glm-130b", **{"vocab_size": 64, "mask_token_id": 59, "gmask_token_id": 60,
                                      "smask_token_id": 61, "sop_token_id": 62, "eop_token_id": 63,
                                      "eos_token_ids": [63], "pad_token_id": 0, **kw})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    corpus = tiny_corpus(d)
    return d, corpus, tiny_tokenizer(d, corpus)


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    c = OptimConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(0, c, 110) == pytest.approx(1e-4)
    assert lr_at(9, c, 110) == pytest.approx(1e-3)
    assert lr_at(60, c, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way down the cosine
    assert lr_at(110, c, 110) == pytest.approx(1e-4)
    assert all(lr_at(s, c, 110) >= lr_at(s + 1, c, 110) for s in range(9, 110))


def test_batch_size_warmup_in_whole_micro_batches():
    c = OptimConfig(batch_size=64, micro_batch_size=8, batch_warmup_start=8, batch_warmup_steps=8)
    sizes = [batch_size_at(s, c) for s in range(10)]
    assert sizes == [8, 8, 16, 24, 32, 40, 48, 56, 64, 64]  # 8 + 7 s, rounded down to a multiple of 8
    with pytest.raises(GLMError):
        OptimConfig(batch_size=20, micro_batch_size=8)


def test_clip_to_total_norm_one():
    ps = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    ps[0].grad, ps[1].grad = torch.tensor([3.0, 0, 0]), torch.tensor([0, 4.0, 0])
    f = clip_grads(ps, 1.0, 5.0)
    assert f == pytest.approx(0.2, rel=1e-6)
    assert math.hypot(*ps[0].grad.tolist(), *ps[1].grad.tolist()) == pytest.approx(1.0, rel=1e-5)


def test_no_weight_decay_on_biases_and_norms():
    cfg = small130b()
    m = GLMModel(cfg, OpTable("reference", {}, torch.float32, strict=False))
    decay, no_decay = param_groups(list(m.named_parameters()), 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or "norm" in names[id(p)] for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"embed.weight", "layers.0.attn.qkv.weight"}


def test_deepnorm_init_scales():
    """Xavier-normal std sqrt(2/(fan_in+fan_out)); times beta = (2N)^-1/2 for V, out, FFN."""
    cfg = small130b(hidden_size=256, num_heads=4, num_kv_heads=4, head_dim=64,
                 rope_dim=64, ffn_hidden_size=512, num_layers=8)
    st = deepnorm_state(cfg, seed=0)
    beta = 16 ** -0.5
    xav = math.sqrt(2 / (256 + 256))
    qkv = st["layers.3.attn.qkv.weight"].view(4, 3, 64, 256)  # per-head interleaved [q; k; v]
    assert qkv[:, 0].std().item() == pytest.approx(xav, rel=0.03)
    assert qkv[:, 2].std().item() == pytest.approx(beta * xav, rel=0.03)
    assert st["layers.3.attn.dense.weight"].std().item() == pytest.approx(beta * xav, rel=0.03)
    assert st["layers.3.mlp.fc1.weight"].std().item() == pytest.approx(beta * math.sqrt(2 / (256 + 1024)), rel=0.03)
    assert st["layers.3.mlp.fc2.weight"].std().item() == pytest.approx(beta * math.sqrt(2 / (512 + 256)), rel=0.03)
    assert (st["layers.3.attn.qkv.bias"] == 0).all() and (st["final_norm.weight"] == 1).all()


def test_embedding_gradient_shrink_scales_only_the_input_path():
    """Tied embeddings: the gradient into embed.weight is alpha * (input-embedding part) +
    (output-projection part), computed separately with autograd on an unshrunk model."""
    cfg = small130b()
    st = deepnorm_state(cfg, seed=1)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10).expand(2, 10)

    def grads(alpha, detach_output=False):
        ops = OpTable("reference", {}, torch.float32, strict=False)
        m = GLMModel(cfg, ops)
        m.load_state_dict(st)
        shrink_embedding_gradient(ops, alpha)
        if detach_output:  # only the input path: detach the tied output projection
            ops.lm_head = lambda x, w: torch.nn.functional.linear(x, w.detach())
        m(ids, pos, None).float().pow(2).mean().backward()
        return m.embed.weight.grad

    full, inp = grads(1.0), grads(1.0, detach_output=True)
    shrunk = grads(0.1)
    assert torch.allclose(shrunk, full - 0.9 * inp, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(shrunk, full)


def test_step_is_independent_of_micro_batching(small, tmp_path):
    """One step over 8 rows gives the same loss and gradients as two micro-batches of 4
    (token-weighted mean); fp32 summation order differs, hence 1e-6 relative."""
    d, corpus, tok = small
    out = []
    for micro in (8, 4):
        cfg = tiny_config(tmp_path / str(micro), corpus, tok,
                          optim={"micro_batch_size": micro, "batch_warmup_start": None})
        tr, _ = prepare(cfg, get_backend("cpu"), progress=False)
        out.append(tr.train_step())
    a, b = out
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert a["tokens"] == b["tokens"]


def test_cli_trains_logs_and_plots(small, tmp_path, capsys):
    import yaml

    d, corpus, tok = small
    cfg = tiny_config(tmp_path, corpus, tok, steps=12, save_interval=6, eval_interval=6)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert glmrt(["train", str(f), "--no-progress"]) == 0
    run = tmp_path / "run"
    recs = [json.loads(x) for x in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("loss", "grad_norm", "embed_grad_norm", "loss_scale", "lr", "tokens_per_s", "batch_size"):
        assert all(isinstance(r[key], (int, float)) for r in recs), key
    assert recs[0]["embed_grad_norm"] < recs[0]["grad_norm"]
    assert "eval_loss" in recs[5] and "eval_loss" in recs[11]
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert (run / "model" / "config.json").is_file() and (run / "model" / "tokenizer.model").is_file()
    # the exported model loads with the inference API
    from glm_runtime import load_model
    from glm_runtime.core.tokenizer import Tokenizer

    m = load_model(run / "model", backend="cpu")
    c = m.config
    assert (c.residual, c.activation, c.rope, c.attention) == ("deepnorm", "geglu", "neox", "prefix")
    tk = Tokenizer(m.tokenizer_path, c)  # the exported ids line up with the tokenizer's layout
    assert tk.vocab_size == c.vocab_size and tk.special["mask"] == c.mask_token_id
    assert tk.decode(tk.encode("hello world")) == "hello world"
    png = tmp_path / "curves.png"
    assert glmrt(["plot-run", str(run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # all steps done: a second call resumes, trains nothing and re-exports; it holds the run
    # directory's lock, so a killed save's temporary there is a dead run's and goes
    stale = run / "checkpoints" / ".step-00000099.tmp"
    stale.mkdir()
    assert glmrt(["train", str(f), "--no-progress"]) == 0
    assert not stale.exists()
    # a changed model cannot resume this run: one line, before any weight is read
    cfg["model"]["hidden_size"] = 48
    f.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert glmrt(["train", str(f), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different model/tokenizer config" in err, err


def test_cli_errors_are_one_line(small, tmp_path, capsys):
    import yaml

    d, corpus, tok = small
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tiny_config(tmp_path, corpus, tok, precision="fp16")))
    assert glmrt(["train", str(f), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot compute in fp16" in err and len(err.splitlines()) == 1
    f.write_text(yaml.safe_dump(tiny_config(tmp_path, corpus, tok, optim={"betas": 1})))
    assert glmrt(["train", str(f), "--no-progress"]) == 2
    assert "unknown optim field(s): betas" in capsys.readouterr().err
    assert glmrt(["plot-run", str(tmp_path / "nothing")]) == 2


def test_trained_model_ids_match_its_tokenizer(small):
    """The model config made for a trained tokenizer lays out ids as the tokenizer wrapper
    reads them back with that config (specials right after the pieces, no image offset)."""
    from glm_runtime.core.tokenizer import Tokenizer
    from glm_runtime.training.run import model_config

    d, corpus, tok_file = small
    tok = Tokenizer(tok_file)
    for model in ({}, {"preset": "tiny-chatglm-6b"}, {"preset": "tiny-chatglm2"}):
        c = model_config(model, tok)
        back = Tokenizer(tok_file, c)
        assert back.encode("a [MASK] b") == tok.encode("a [MASK] b"), model
        assert back.special["mask"] == c.mask_token_id == tok.sp.get_piece_size()

