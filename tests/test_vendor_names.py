"""No vendor names in the backend-neutral core: glm_core/ and parallel/ must ask the
backend (device type, capabilities, distributed backend name) instead."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERN = re.compile(r"torch\.cuda|torch_npu|torch\.npu|torch\.version\.hip|\.cuda\(|\bis_cuda\b"
                     r"|[\"'](cuda|nccl|hccl|rccl|npu|hip)(:\d+)?[\"']")


def offending_lines(paths, root=ROOT):
    hits = []
    for p in paths:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if PATTERN.search(line):
                hits.append(f"{p.relative_to(root)}:{n}: {line.strip()}")
    return hits


def test_core_and_parallel_name_no_vendor():
    files = [p for d in ("glm_core", "parallel") for p in (ROOT / d).rglob("*.py")]
    assert files, "nothing scanned"
    assert offending_lines(files) == []


def test_the_check_catches_a_planted_name(tmp_path):
    planted = tmp_path / "bad.py"
    planted.write_text('import torch\nx = torch.ones(1).to("cuda")\ny = torch.cuda.is_available()\n'
                       'z = "nccl"\n')
    assert len(offending_lines([planted], root=tmp_path)) == 3
