"""Bad input, as a careless or hostile user produces it: the README's promise, case by case.

Every case of the table runs the command line in-process (``glmrt``'s ``main``) or calls the
Python API, and checks all of the promise at once: the exit status (2 for the user's
mistake), exactly one line on stderr naming the culprit (the file, option or value) and
the problem, no traceback, nothing on stdout, and nothing written anywhere under the
test's directories (no output, no temporary, no lock file).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_runtime.cli.main import main as glmrt
from glm_runtime.core.errors import GLMError


@pytest.fixture(scope="module")
def w(hf_dirs, tmp_path_factory):
    """Shared, never modified: a native checkpoint, a transformers one, a training config."""
    root = tmp_path_factory.mktemp("bad-input")
    assert glmrt(["convert", str(hf_dirs["glm"]), str(root / "native")]) == 0
    shutil.copytree(hf_dirs["glm"], root / "hf")
    return SimpleNamespace(root=root, native=root / "native", hf=root / "hf")


def copy(src: Path, tmp: Path, name: str = "m") -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def native_with(w, tmp, **changes) -> Path:
    m = copy(w.native, tmp)
    edit_json(m / "config.json", **changes)
    return m


def hf_with(w, tmp, **changes) -> Path:
    m = copy(w.hf, tmp)
    edit_json(m / "config.json", **changes)
    return m


def poisoned(w, tmp, key: str, value: float) -> Path:
    m = copy(w.native, tmp)
    state = load_file(m / "model.safetensors")
    state[key].view(-1)[3] = value
    save_file(state, m / "model.safetensors")
    return m


def config_dir(w, tmp, make) -> Path:
    """The native checkpoint with its config.json replaced by what ``make(path)`` creates."""
    m = copy(w.native, tmp)
    (m / "config.json").unlink()
    make(m / "config.json")
    return m


def run_config(tmp, text: str) -> str:
    f = tmp / "run.yaml"
    f.write_text(text)
    return str(f)


def train_config(tmp, **over) -> str:
    cfg = {"run_dir": str(tmp / "run"), "steps": 2, **over}
    f = tmp / "train.json"
    f.write_text(json.dumps(cfg))
    return str(f)


# (case id, argv from (w, tmp), exit status, what the one line must contain)
CLI = [
    # ---------------------------------------------------------------- generate
    ("missing model dir", lambda w, t: ["generate", t / "nope", "--ids", "1,2"], 2, ["nope", "no such file"]),
    ("model is a file", lambda w, t: ["generate", w.native / "config.json", "--ids", "1"], 2,
     ["config.json", "this is a file"]),
    ("truncated safetensors", lambda w, t: ["generate", _truncated(w, t), "--ids", "1,2"], 2,
     ["model.safetensors", "truncated or corrupt"]),
    ("config does not match weights", lambda w, t: ["generate", native_with(w, t, ffn_hidden_size=104), "--ids", "1"],
     2, ["mlp.fc1.weight", "shape"]),
    ("unknown backend", lambda w, t: ["generate", w.native, "--ids", "1", "--backend", "tpu9000"], 2,
     ["unknown backend 'tpu9000'", "cpu (available"]),
    ("id outside the vocabulary", lambda w, t: ["generate", w.native, "--ids", "1,99999"], 2,
     ["token id 99999", "outside the vocabulary", "320"]),
    ("ids beyond int64", lambda w, t: ["generate", w.native, "--ids", f"1,{2**70}"], 2, ["--ids", str(2**70)]),
    ("ids not integers", lambda w, t: ["generate", w.native, "--ids", "1,x"], 2, ["--ids", "'1,x'"]),
    ("negative top-k", lambda w, t: ["generate", w.native, "--ids", "1", "--top-k", "-3"], 2,
     ["--top-k", "-3", "[0, "]),
    ("nan temperature", lambda w, t: ["generate", w.native, "--ids", "1", "--temperature", "nan", "--do-sample"], 2,
     ["--temperature", "nan", "> 0"]),
    ("zero temperature", lambda w, t: ["generate", w.native, "--ids", "1", "--temperature", "0"], 2,
     ["--temperature", "0", "> 0"]),
    ("seed beyond 64 bits", lambda w, t: ["generate", w.native, "--ids", "1", "--seed", str(2**70)], 2,
     ["--seed", str(2**70)]),
    ("top-p zero", lambda w, t: ["generate", w.native, "--ids", "1", "--top-p", "0"], 2, ["--top-p", "(0, 1]"]),
    ("top-p above one", lambda w, t: ["generate", w.native, "--ids", "1", "--top-p", "1.5"], 2,
     ["--top-p", "1.5", "(0, 1]"]),
    ("zero new tokens", lambda w, t: ["generate", w.native, "--ids", "1", "--max-new-tokens", "0"], 2,
     ["--max-new-tokens", "0"]),
    # the context limit is checked before anything is allocated (a billion positions of KV
    # cache would be hundreds of GB): both numbers and the limit in the message
    ("new tokens beyond the context", lambda w, t: ["generate", w.native, "--ids", "1,2", "--max-new-tokens",
                                                    "1000000000"], 2,
     ["prompt (2 tokens)", "max new tokens (1000000000)", "more than the model's"]),
    ("prompt beyond the context", lambda w, t: ["generate", w.native, "--ids", ",".join(["5"] * 5000),
                                                "--max-new-tokens", "1"], 2,
     ["prompt (5000 tokens)", "more than the model's"]),
    ("negative stop id", lambda w, t: ["generate", w.native, "--ids", "1", "--stop", "-1"], 2, ["--stop", "-1"]),
    ("tp zero", lambda w, t: ["generate", w.native, "--ids", "1", "--tp", "0"], 2, ["--tp", "0"]),
    ("unknown option", lambda w, t: ["generate", w.native, "--bogus"], 2, ["unrecognized arguments: --bogus"]),
    ("run config backend is a number", lambda w, t: ["generate", w.native, "--ids", "1", "--config",
                                                       run_config(t, "backend: 5\n")], 2, ["run.yaml", "backend=5"]),
    ("run config backend is a list", lambda w, t: ["generate", w.native, "--ids", "1", "--config",
                                                     run_config(t, "backend: [cpu]\n")], 2,
     ["run.yaml", "backend=['cpu']"]),
    ("run config unknown key", lambda w, t: ["generate", w.native, "--ids", "1", "--config",
                                               run_config(t, "backnd: cpu\n")], 2, ["backnd", "did you mean backend"]),
    ("run config not a mapping", lambda w, t: ["generate", w.native, "--ids", "1", "--config",
                                                 run_config(t, "- cpu\n")], 2, ["run.yaml", "mapping"]),
    ("run config is a directory", lambda w, t: ["generate", w.native, "--ids", "1", "--config", t], 2,
     ["run config file is a directory"]),
    ("run config too large", lambda w, t: ["generate", w.native, "--ids", "1", "--config",
                                             run_config(t, "#" * (5 << 20))], 2, ["run.yaml", "larger than 4 MiB"]),
    ("run config integer beyond the digit limit", lambda w, t: ["generate", w.native, "--ids", "1", "--config",
                                                                  run_config(t, "backend: 1" + "0" * 5000)], 2,
     ["run.yaml", "not a run config"]),
    ("run config alias bomb", lambda w, t: ["generate", w.native, "--ids", "1", "--config", run_config(t, BOMB)], 2,
     ["run.yaml", "backend=[[", "expected a string"]),
    ("config.json is a directory", lambda w, t: ["generate", config_dir(w, t, Path.mkdir), "--ids", "1"], 2,
     ["config.json", "is a directory"]),
    ("config.json not UTF-8", lambda w, t: ["generate", config_dir(w, t, lambda f: f.write_bytes(b"{\xff\xfe}")),
                                            "--ids", "1"], 2, ["config.json", "not UTF-8", "0xff"]),
    ("config.json is /dev/zero", lambda w, t: ["generate", config_dir(w, t, lambda f: f.symlink_to("/dev/zero")),
                                               "--ids", "1"], 2, ["config.json", "larger than 4 MiB"]),
    ("config.json nested too deeply", lambda w, t: ["generate", config_dir(w, t, lambda f: f.write_text("[" * 10**5)),
                                                    "--ids", "1"], 2, ["config.json", "nested too deeply"]),
    ("no context positions", lambda w, t: ["generate", native_with(w, t, max_position_embeddings=0), "--ids", "1"], 2,
     ["config.json", "max_position_embeddings=0", "[1, "]),
    ("negative norm epsilon", lambda w, t: ["generate", native_with(w, t, norm_eps=-1), "--ids", "1"], 2,
     ["config.json", "norm_eps=-1", "(0, 1]"]),
    ("zero rope base", lambda w, t: ["generate", native_with(w, t, rope_base=0), "--ids", "1"], 2,
     ["config.json", "rope_base=0", "> 0"]),
    ("layer count is text", lambda w, t: ["generate", native_with(w, t, num_layers="2"), "--ids", "1"], 2,
     ["config.json", "num_layers='2'", "an integer"]),
    ("unknown config field", lambda w, t: ["generate", native_with(w, t, hidden=3), "--ids", "1"], 2,
     ["config.json", "unknown GLM config field(s): hidden"]),
    ("NaN in a weight", lambda w, t: ["generate", poisoned(w, t, "layers.0.attn.qkv.weight", float("nan")),
                                      "--ids", "1,2"], 2,
     ["layers.0.attn.qkv.weight", "NaN/inf", "--no-check-weights"]),
    ("inf embedding", lambda w, t: ["generate", poisoned(w, t, "embed.weight", float("inf")), "--ids", "1"], 2,
     ["embed.weight", "NaN/inf"]),
    # ----------------------------------------------------------------- convert
    ("hf config lacks heads", lambda w, t: ["convert", hf_with(w, t, num_attention_heads=...), t / "out"], 2,
     ["config.json", "num_attention_heads"]),
    ("hf config lacks vocabulary", lambda w, t: ["convert", hf_with(w, t, vocab_size=...), t / "out"], 2,
     ["config.json", "vocab_size"]),
    ("hf epsilon is text", lambda w, t: ["convert", hf_with(w, t, rms_norm_eps="abc"), t / "out"], 2,
     ["config.json", "rms_norm_eps='abc'"]),
    ("hf heads zero", lambda w, t: ["convert", hf_with(w, t, num_attention_heads=0), t / "out"], 2,
     ["config.json", "num_attention_heads=0"]),
    ("hf rope parameters not a mapping", lambda w, t: ["convert", hf_with(w, t, rope_parameters=[1]), t / "out"], 2,
     ["config.json", "rope_parameters"]),
    ("not a checkpoint", lambda w, t: ["convert", _llama(t), t / "out"], 2, ["not a recognised GLM checkpoint"]),
    ("output under a file", lambda w, t: ["convert", w.native, _file(t) / "sub" / "out"], 2,
     ["a-file/sub/out", "cannot write the output"]),
    ("output on a file system that refuses it", lambda w, t: ["convert", w.native, "/sys/glmrt-test-out"], 2,
     ["/sys/glmrt-test-out", "cannot write the output"]),
    ("output exists", lambda w, t: ["convert", w.native, _file(t).parent], 2, ["already exists", "--force"]),
    ("output contains the source", lambda w, t: ["convert", copy(w.native, t / "par", "child"), t / "par", "--force"],
     2, ["par", "would replace the source"]),
    ("output is the source", lambda w, t: ["convert", copy(w.native, t), t / "m", "--force"], 2,
     ["would replace the source"]),
    ("output inside the source", lambda w, t: ["convert", copy(w.native, t), t / "m" / "out"], 2,
     ["lies inside the source"]),
    ("convert NaN weights", lambda w, t: ["convert", poisoned(w, t, "final_norm.weight", float("nan")), t / "out"], 2,
     ["final_norm.weight", "NaN/inf"]),
    ("convert tp zero", lambda w, t: ["convert", w.native, t / "out", "--to", "sat", "--tp", "0"], 2, ["--tp", "0"]),
    ("convert unknown target", lambda w, t: ["convert", w.native, t / "out", "--to", "gguf"], 2, ["--to", "gguf"]),
    ("sat args for a native checkpoint", lambda w, t: ["convert", w.native, t / "out", "--sat-args", "glm-130b"], 2,
     ["--sat-args", "native checkpoint"]),
    # ---------------------------------------------------------------- quantize
    ("quantize three bits", lambda w, t: ["quantize", w.native, t / "out", "--bits", "3"], 2, ["--bits", "3"]),
    ("quantize onto the source", lambda w, t: ["quantize", copy(w.native, t), t / "m", "--bits", "8", "--force"], 2,
     ["would replace the source"]),
    ("quantize missing source", lambda w, t: ["quantize", t / "nope", t / "out", "--bits", "8"], 2,
     ["nope", "no such file"]),
    # ------------------------------------------------------------- export-onnx
    ("opset 99", lambda w, t: ["export-onnx", w.native, t / "out", "--opset", "99"], 2, ["--opset", "99", "[17, "]),
    ("opset 16", lambda w, t: ["export-onnx", w.native, t / "out", "--opset", "16"], 2, ["--opset", "16"]),
    ("export inside the source", lambda w, t: ["export-onnx", copy(w.native, t), t / "m" / "onnx"], 2,
     ["lies inside the source"]),
    # ------------------------------------------------------------------- train
    ("train lr nan", lambda w, t: ["train", train_config(t, optim={"lr": float("nan")})], 2,
     ["train.json", "lr=nan", "> 0"]),
    ("train zero steps", lambda w, t: ["train", train_config(t, steps=0)], 2, ["train.json", "steps=0"]),
    ("train backend a number", lambda w, t: ["train", train_config(t, backend=5)], 2, ["train.json", "backend=5"]),
    ("train unknown key", lambda w, t: ["train", train_config(t, step=3)], 2, ["train.json", "step (did you mean"]),
    ("train model zero positions", lambda w, t: ["train", train_config(t, model={"max_position_embeddings": 0})], 2,
     ["max_position_embeddings=0"]),
    ("train model unknown preset", lambda w, t: ["train", train_config(t, model={"preset": "gpt-5"})], 2,
     ["preset='gpt-5'"]),
    ("train model not a mapping", lambda w, t: ["train", train_config(t, model="tiny")], 2, ["model='tiny'"]),
    ("train short sequences", lambda w, t: ["train", train_config(t, data={"seq_len": 8})], 2, ["seq_len=8"]),
    ("train corpus missing", lambda w, t: ["train", train_config(t, data={"corpus": str(t / "no-corpus")})], 2,
     ["no-corpus", "corpus not found"]),
    ("train tokenizer missing", lambda w, t: ["train", train_config(t, data={"tokenizer": str(t / "tok.model")})], 2,
     ["tok.model", "tokenizer model not found"]),
    ("train export replaces the run", lambda w, t: ["train", train_config(t, export=str(t))], 2,
     ["would replace the source"]),
    ("train config missing", lambda w, t: ["train", t / "nope.yaml"], 2, ["nope.yaml", "not found"]),
    ("train config bad YAML", lambda w, t: ["train", run_config(t, "steps: [\n")], 2, ["run.yaml", "not valid YAML"]),
    ("train seed not an integer", lambda w, t: ["train", "--run-dir", t / "run", "--steps", "1", "--seed", "1e3"], 2,
     ["--seed", "1e3"]),
    ("train seed beyond 64 bits", lambda w, t: ["train", "--run-dir", t / "run", "--steps", "1", "--seed",
                                                 str(2**70)], 2, [f"seed={2**70}"]),
    ("train run dir under a file", lambda w, t: ["train", train_config(t, run_dir=str(_file(t) / "run"))], 2,
     ["a-file/run", "Not a directory"]),
    ("plot a log that is not a training log", lambda w, t: ["plot-run", _foreign_log(t)], 2,
     ["train.jsonl", "no number for lr"]),
    # ------------------------------------------------------------------ launch
    ("launch missing command", lambda w, t: ["launch", "-n", "2", "--", "no-such-command-xyz"], 2,
     ["glmrt launch: error:", "no-such-command-xyz", "not found"]),
    ("launch zero ranks", lambda w, t: ["launch", "-n", "0", "--", "true"], 2, ["glmrt launch: error:", "-n/--nproc"]),
    ("launch unknown launcher", lambda w, t: ["launch", "-n", "2", "--launcher", "pbs", "--", "true"], 2,
     ["--launcher", "pbs"]),
    ("launch run config backend a list", lambda w, t: ["launch", "-n", "2", "--config",
                                                         run_config(t, "backend: [cpu]\n"), "--", "true"], 2,
     ["glmrt launch: error:", "backend=['cpu']"]),
]


# 9**9 leaves behind nine shared lists: cheap to parse, endless to print in full
BOMB = "backend: [&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")) + "]\n"


def _foreign_log(tmp) -> Path:
    (tmp / "run").mkdir()
    (tmp / "run" / "train.jsonl").write_text('{"step": 1}\n[1, 2]\nnot json\n')
    return tmp / "run"


def _truncated(w, tmp) -> Path:
    m = copy(w.native, tmp)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return m


def _llama(tmp) -> Path:
    (tmp / "llama").mkdir()
    (tmp / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp / "llama"


def _file(tmp) -> Path:
    (tmp / "a-file").write_text("not a directory")
    return tmp / "a-file"


def tree(*roots) -> dict:
    return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size) for r in roots for p in Path(r).rglob("*")}


def assert_one_line(err: str, needles) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("make, status, needles", [pytest.param(*c[1:], id=c[0]) for c in CLI])
def test_cli_bad_input(w, tmp_path, capsys, make, status, needles):
    argv = [str(a) for a in make(w, tmp_path)]
    before = tree(tmp_path, w.root)
    capsys.readouterr()
    assert glmrt(argv) == status
    out, err = capsys.readouterr()
    line = assert_one_line(err, needles)
    assert line.startswith(f"glmrt {argv[0]}: error: "), line
    assert out == ""
    assert tree(tmp_path, w.root) == before  # nothing written, nothing left behind


# ----------------------------------------------------------------- Python API
def _load(path):
    from glm_runtime import load_model

    return lambda: load_model(path, backend="cpu")


def _generate(w, ids, **kw):
    from glm_runtime import load_model

    m = load_model(w.native, backend="cpu")
    return lambda: m.generate(ids, **kw)


def _save_under_file(w, tmp):
    from glm_runtime.converters import native
    from glm_runtime.converters.detect import load_checkpoint

    _, cfg, state, _ = load_checkpoint(w.native)
    target = _file(tmp) / "out"
    return lambda: native.save(target, cfg, state)


def _config(**changes):
    from glm_runtime import GLMConfig
    from glm_runtime.core.presets import PRESETS

    return lambda: GLMConfig(**dict(PRESETS["tiny-glm-4-0414"], **changes))


# (case id, the call from (w, tmp): its inputs are made first, then it runs, what the message must contain)
API = [
    ("load missing", lambda w, t: _load(t / "nope"), ["nope", "no such file"]),
    ("load NaN weights", lambda w, t: _load(poisoned(w, t, "lm_head.weight", float("nan"))),
     ["lm_head.weight", "NaN/inf"]),
    ("load config from /dev/zero", lambda w, t: _load(config_dir(w, t, lambda f: f.symlink_to("/dev/zero"))),
     ["config.json", "larger than"]),
    ("load config not a mapping", lambda w, t: _load(config_dir(w, t, lambda f: f.write_text("[1]"))),
     ["config.json", "JSON object"]),
    ("generate id outside vocabulary", lambda w, t: _generate(w, [[1, 400]]), ["token id 400"]),
    ("generate no new tokens", lambda w, t: _generate(w, [[1, 2]], max_new_tokens=0), ["max_new_tokens"]),
    ("generate id beyond int64", lambda w, t: _generate(w, [[1, 2**70]]), ["token ids", "Overflow"]),
    ("generate float ids", lambda w, t: _generate(w, [[1.5, 2.0]]), ["integer token ids", "float32"]),
    ("generate ragged ids", lambda w, t: _generate(w, [[1, 2], [3]]), ["[batch, length]"]),
    ("generate beyond the context", lambda w, t: _generate(w, [[1, 2]], max_new_tokens=10**9),
     ["max new tokens (1000000000)", "more than the model's"]),
    ("config bad epsilon", lambda w, t: _config(norm_eps=float("inf")), ["norm_eps=inf"]),
    ("config bool as size", lambda w, t: _config(hidden_size=True), ["hidden_size=True"]),
    ("config float bits", lambda w, t: _config(quantization_bits=4.0), ["quantization_bits=4.0"]),
    ("save under a file", _save_under_file, ["a-file/out", "cannot write the output"]),
]


@pytest.mark.parametrize("make, needles", [pytest.param(*c[1:], id=c[0]) for c in API])
def test_api_bad_input(w, tmp_path, make, needles):
    call = make(w, tmp_path)
    before = tree(tmp_path, w.root)
    with pytest.raises(GLMError) as e:
        call()
    assert_one_line(str(e.value), needles)
    assert tree(tmp_path, w.root) == before


def test_the_table_covers_every_command(w, tmp_path):
    commands = set()
    for i, case in enumerate(CLI):
        (tmp_path / str(i)).mkdir()
        commands.add(str(case[1](w, tmp_path / str(i))[0]))
    assert commands == {"generate", "convert", "quantize", "export-onnx", "train", "plot-run", "launch"}
    assert len(CLI) + len(API) >= 40


# ----------------------------------------------------------- the rest of the promise
def test_debug_shows_traceback(w):
    with pytest.raises(GLMError, match="token id 99999"):  # raised, for the interpreter to print
        glmrt(["--debug", "generate", str(w.native), "--ids", "99999"])


def test_a_bug_is_one_line_with_a_hint(monkeypatch, capsys):
    from glm_runtime.cli import backends

    monkeypatch.setattr(backends, "run", lambda args: 1 / 0)
    assert glmrt(["backends"]) == 1
    line = assert_one_line(capsys.readouterr().err, ["glmrt backends: internal error: ZeroDivisionError",
                                                      "--debug"])
    assert "a bug" in line


def test_full_file_system_is_one_line_and_leaves_nothing(w, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of writing (simulated): one line naming the output, no output,
    no temporary, no lock file."""
    from glm_runtime.converters import native

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(native, "save_file", full)
    assert glmrt(["convert", str(w.native), str(tmp_path / "out")]) == 2
    assert_one_line(capsys.readouterr().err, [str(tmp_path / "out"), "No space left on device"])
    assert list(tmp_path.iterdir()) == []


def test_no_check_weights_loads_them_anyway(w, tmp_path, capsys):
    """The load goes through; generation then meets the NaN logits and stops with one line
    naming the step (never prints them as text)."""
    m = poisoned(w, tmp_path, "layers.0.attn.qkv.weight", float("nan"))
    assert glmrt(["generate", str(m), "--ids", "1,2", "--max-new-tokens", "1", "--no-check-weights",
                  "--backend", "cpu"]) == 2
    assert_one_line(capsys.readouterr().err, ["non-finite logits at generation step 0"])
    # the onnx backend's export check meets them first, and says so
    assert glmrt(["generate", str(m), "--ids", "1,2", "--max-new-tokens", "1", "--no-check-weights",
                  "--backend", "onnx"]) == 2
    assert_one_line(capsys.readouterr().err, ["non-finite logits", "NaN/inf in its weights"])
    assert os.environ.get("GLM_CHECK_WEIGHTS") is None  # the switch was for that load only


@pytest.mark.parametrize("cmd", ["generate", "convert", "backends", "launch"])
def test_help_has_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        glmrt([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "example:" in out and "glmrt " + cmd in out


def test_written_files_follow_the_umask(w, tmp_path):
    """safetensors creates its files 0600; a converted model must be readable as the umask says."""
    from glm_runtime.converters import native
    from glm_runtime.converters.detect import load_checkpoint

    _, cfg, state, _ = load_checkpoint(w.native)
    old = os.umask(0o022)
    try:
        out = native.save(tmp_path / "out", cfg, state)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes == {name: 0o644 for name in modes} and "model.safetensors" in modes, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_run_config_backend_is_used(w, tmp_path, capsys):
    rc = run_config(tmp_path, "backend: nonesuch\n")
    assert glmrt(["generate", str(w.native), "--ids", "1", "--config", rc]) == 2
    assert_one_line(capsys.readouterr().err, ["unknown backend 'nonesuch'"])
    assert glmrt(["generate", str(w.native), "--ids", "1", "--config", rc, "--backend", "cpu",
                  "--max-new-tokens", "2"]) == 0


def test_nan_weights_never_reach_the_output_as_text(w, tmp_path, capsys):
    """A NaN model used to "generate" the argmax of NaNs (token 0, printed as garbage) with
    exit status 0: the weights check stops it at the door."""
    m = poisoned(w, tmp_path, "final_norm.weight", float("nan"))
    assert glmrt(["generate", str(m), "--ids", "1,2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line(err, ["final_norm.weight", "NaN/inf"])


def test_unpickled_checkpoint_is_refused_without_running_code(tmp_path):
    """A pickle that would run code is refused by torch.load(weights_only=True)."""
    from glm_runtime.converters.tensor_io import read_pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Boom()}, tmp_path / "evil.bin")
    with pytest.raises(GLMError, match="refusing to load"):
        read_pickle(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned").exists()
