"""HF -> native -> HF round trip: bit-exact tensors, and transformers loads the result."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model
from safetensors.torch import load_file

from glm_runtime.cli.main import main as glmrt
from glm_runtime.converters import hf, native
from glm_runtime.converters.detect import load_checkpoint


def hf_tensors(d):
    files = sorted(d.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_round_trip_bit_exact(kind, hf_dirs, tmp_path):
    src = hf_dirs[kind]
    assert glmrt(["convert", str(src), str(tmp_path / "native")]) == 0
    assert native.is_native(tmp_path / "native")
    assert glmrt(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "hf"]) == 0
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_transformers_loads_our_output(kind, hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    _, cfg, state, _ = load_checkpoint(hf_dirs[kind])
    hf.write(tmp_path / "out", cfg, state)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = make_hf_model(kind)
    assert type(theirs) is type(ref)
    ids = torch.randint(2, 320, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ref(ids).logits)


def test_native_config_records_everything(hf_dirs, tmp_path):
    glmrt(["convert", str(hf_dirs["glm4"]), str(tmp_path / "n")])
    c = json.loads((tmp_path / "n" / "config.json").read_text())
    assert c["format"] == native.FORMAT_TAG
    assert (c["head_dim"], c["num_kv_heads"], c["rope_dim"], c["sandwich_norm"]) == (24, 2, 12, True)


def test_convert_refuses_to_overwrite_and_force_replaces(hf_dirs, tmp_path, capsys):
    out = tmp_path / "n"
    assert glmrt(["convert", str(hf_dirs["glm"]), str(out)]) == 0
    assert glmrt(["convert", str(hf_dirs["glm"]), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert glmrt(["convert", str(hf_dirs["glm4"]), str(out), "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["sandwich_norm"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["n"]  # no temporary directory left behind
