"""The GPU check (benchmarks/gpu_check.py) cannot rot: its dry run runs every section on the
CPU, and the results must have the structure the GPU run will fill.

What the dry run cannot show (anything a GPU measures, the device graph itself) is
recorded by the script as skipped with its reason; this test holds every section to
having run, and every skip to saying why. The orchestration is checked where it matters
on the GPU: a section that raises is recorded with its one-line reason, and a section
that overruns its budget is killed with what it had measured kept.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = {"conformance", "parity", "speed", "kernels", "graphs"}
FAMILIES = ("tiny-glm-130b", "tiny-chatglm-6b", "tiny-chatglm2", "tiny-glm-4", "tiny-glm-4-0414")


def script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def finite_positive(x):
    return isinstance(x, (int, float)) and x > 0 and x == x and x != float("inf")


@pytest.mark.slow
def test_dry_run_runs_every_section_and_fills_the_results(tmp_path):
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["dry_run"] is True and doc["dry_run_note"].startswith("DRY RUN")
    assert doc["environment"]["target"].startswith("cpu standing in") and doc["wall_s"] < 300
    assert set(doc["sections"]) == SECTIONS
    for name, sec in doc["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("reason"))
        assert sec["results"] and "in_progress" not in sec["results"], name
        for line in sec["skipped"]:  # only what truly needs a GPU, each with its reason
            what, why = line.split(": skipped: ")
            assert what in ("the rest of the kit", "CUDA graph capture") and "dry run" in why, line
    log = (tmp_path / "check.log").read_text()
    assert all(f"{name}: started (dry run)" in log for name in SECTIONS)

    kit = doc["sections"]["conformance"]["results"]
    assert set(kit) == {"fp16", "bf16", "fp32"}
    assert all(k["returncode"] == 0 and k["passed"] == 4 and k["failed"] == k["errors"] == 0 for k in kit.values())

    par = doc["sections"]["parity"]["results"]
    assert set(par) == {f"{f}/{d}" for f in FAMILIES for d in ("fp16", "bf16")}
    for key, p in par.items():
        assert p["ok"] and p["logit_range"] > 1 and p["max_error_over_range"] == 0.0, key  # cpu against cpu
        assert [g["agreeing_tokens"] for g in p["greedy"]] == [32, 32], key

    speed = doc["sections"]["speed"]["results"]
    assert finite_positive(speed["copy_bandwidth_gb_s"])
    for dt in ("bf16", "fp16"):
        ours, peer = speed[dt]["ours"], speed[dt]["transformers"]
        assert finite_positive(ours["prefill"]["tokens_per_s"]) and finite_positive(peer["prefill"]["tokens_per_s"])
        for rows in (1, 4):
            assert finite_positive(peer[f"decode_b{rows}"]["tokens_per_s"])
            for mode in ("generate", "recorded"):
                assert finite_positive(ours[f"decode_b{rows}_{mode}"]["tokens_per_s"]), (dt, rows, mode)
                assert finite_positive(speed[dt]["ratios_ours_over_transformers"][f"decode_b{rows}_{mode}"])
            assert ours[f"decode_b{rows}_recorded"]["recorded_rows"] == [rows]
        assert 0 < ours["decode_b1_recorded"]["roofline_fraction"] < 1
        assert peer["facts"]["class"] == "GlmForCausalLM" and peer["facts"]["rotary_dim_matches"]
    for bits in (8, 4):
        q = speed["bf16"][f"ours_int{bits}"]
        assert q["step_bytes"] < speed["bf16"]["ours"]["step_bytes"]
        assert finite_positive(q["decode_b1_recorded"]["tokens_per_s"])

    kern = doc["sections"]["kernels"]["results"]
    assert set(kern["weight_only_matmul"]) == {f"{n}/M{m}" for n in ("qkv", "dense", "fc1", "fc2", "lm_head")
                                              for m in (1, 64)}
    for key, row in kern["weight_only_matmul"].items():
        assert finite_positive(row["int8_speedup_vs_fp16"]) and finite_positive(row["int4_speedup_vs_fp16"]), key
        if row["M"] == 1:  # the kernels' results against the reference, under the interpreter
            assert row["int8_max_rel_error"] < 1e-2 and row["int4_max_rel_error"] < 1e-2, key
    assert set(kern["attention"]) == {"prefill 64", "decode cache 128 batch 1", "decode cache 128 batch 4"}
    assert all(a["max_abs_difference"] < 1e-2 and finite_positive(a["triton_speed_vs_sdpa"])
               for a in kern["attention"].values())
    assert set(kern["elementwise"]) == {"rms_norm", "layer_norm", "rotary interleaved", "glu swiglu", "gelu_tanh"}
    assert all(e["max_abs_difference"] < 2e-2 for e in kern["elementwise"].values()), kern["elementwise"]

    graphs = doc["sections"]["graphs"]["results"]
    for rows in (1, 4):
        g = graphs[f"batch {rows}"]
        assert g["recording_happened"] and g["tokens_identical_recorded_vs_fixed"], g
        assert g["tokens_identical_fixed_vs_generate"] and finite_positive(g["speedup_recorded_over_fixed"])

    goals = doc["goals"]
    assert goals["conformance_all_pass"]["met"] and goals["parity_all_families"]["met"]
    assert all(goals[k]["measured"] is not None for k in goals if k != "note") and "dry run" in goals["note"]


def test_a_section_that_raises_is_recorded_with_its_reason(tmp_path):
    gc = script()
    (tmp_path / "sections").mkdir()
    rec = gc.run_section("graphs", tmp_path, budget=300, dry=False)  # the GPU run on a machine without one
    assert rec["status"] == "error" and "the cuda backend is unavailable" in rec["reason"], rec
    assert "built without CUDA" in rec["reason"] and "\n" not in rec["reason"]


def test_a_section_over_its_budget_is_killed(tmp_path):
    gc = script()
    (tmp_path / "sections").mkdir()
    rec = gc.run_section("kernels", tmp_path, budget=1, dry=True)
    assert rec["status"] == "timeout" and "killed at its budget of 1 s" in rec["reason"], rec
    assert rec["seconds"] < 10


def test_refuses_a_gpu_run_without_a_gpu_and_unknown_sections(tmp_path, capsys):
    gc = script()
    assert gc.main(["--out", str(tmp_path), "--only", "speed,nonesuch"]) == 2
    assert "unknown section(s): nonesuch" in capsys.readouterr().err
    assert gc.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
