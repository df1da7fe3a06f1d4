"""The main job: `glmrt generate` on the bundled glm-tiny model, as the README runs it."""
from __future__ import annotations

import os
import subprocess
import sys

PROMPT = "The quick brown [MASK] jumps over the lazy dog."


def glmrt(*args):
    return subprocess.run([sys.executable, "-m", "glm_runtime.cli.main", "generate", "--backend", "cpu",
                           "--strict-ops", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0"))


def test_fills_a_mask_with_the_bundled_model():
    p = glmrt("--prompt", PROMPT, "--do-sample", "--seed", "1", "--max-new-tokens", "12")
    assert p.returncode == 0, p.stderr
    out = p.stdout.strip()
    assert out.startswith("The quick brown") and out.endswith("jumps over the lazy dog.")
    filled = out[len("The quick brown"):-len("jumps over the lazy dog.")].strip()
    assert filled and "[MASK]" not in out


def test_continues_a_gmask_prompt():
    p = glmrt("--prompt", "Beautiful is better than ugly. [gMASK]", "--do-sample", "--seed", "2",
              "--max-new-tokens", "12")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Beautiful is better than ugly.")
    assert len(p.stdout.strip()) > len("Beautiful is better than ugly.")
