"""Run monitoring: one JSON line per step (and per evaluation) plus a console progress bar.

Per step: loss, total gradient norm, the embedding layer's gradient norm on its own (the
early warning of a loss spike in GLM-130B's training), loss scale, learning rate, batch
size, tokens and tokens/s, and whether the step was skipped for an overflow. The log of a
resumed run is cut back to the checkpoint's step first, so the file always holds one
uninterrupted curve.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from glm_runtime.core.files import writing

LOG = "train.jsonl"


class RunLog:
    def __init__(self, run_dir: str | os.PathLike, resume_step: int):
        self.path = Path(run_dir) / LOG
        kept = [r for r in read_log(self.path) if r["step"] <= resume_step] if resume_step else []
        tmp = self.path.with_name(LOG + ".part")
        with writing(self.path, "training log"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
            self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        with writing(self.path, "training log"):
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    """Records of a run log; a torn last line (process killed mid-write), or any line that
    is not a step's record, is ignored."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out
