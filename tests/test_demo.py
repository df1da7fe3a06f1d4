"""The main job: `glmrt generate` on the bundled model, as the README runs it."""
from __future__ import annotations

import os
import subprocess
import sys


def test_generate_with_bundled_model():
    p = subprocess.run([sys.executable, "-m", "glm_core.cli.main", "generate", "--backend", "cpu", "--prompt",
                        "The file object", "--max-new-tokens", "12", "--strict-ops"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("The file object")
    assert len(p.stdout.split()) > 3
