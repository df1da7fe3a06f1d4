"""Shared helpers of the training tests: a tiny corpus, tokenizer and training config made in
a temporary directory (nothing is downloaded; the text is cut from the bundled corpus)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def tiny_corpus(d: Path, docs_per_file: int = 120) -> Path:
    """A small corpus: the first documents of each bundled English corpus file (a tiny
    tokenizer cannot cover the Chinese file's thousands of characters)."""
    out = d / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    from glm_runtime.training.data import read_documents

    for f in sorted((ROOT / "data" / "corpus").glob("en_*.txt")):
        docs = read_documents([f])[:docs_per_file]
        (out / f.name).write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return out


def tiny_tokenizer(d: Path, corpus: Path, vocab: int = 400) -> Path:
    from glm_runtime.training.data import corpus_files, train_tokenizer

    return train_tokenizer(corpus_files(corpus), d / "tok" / "tokenizer", vocab, heldout_every=8)


def tiny_config(d: Path, corpus: Path, tokenizer: Path, **over) -> dict:
    cfg = {
        "run_dir": str(d / "run"), "steps": 40, "seed": 3, "threads": 1, "backend": "cpu",
        "save_interval": 10, "eval_interval": 20, "eval_batches": 1,
        "model": {"preset": "tiny-glm-130b", "family": "glm-tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                  "num_kv_heads": 2, "head_dim": 16, "rope_dim": 16, "ffn_hidden_size": 48,
                  "max_position_embeddings": 128},
        "data": {"corpus": str(corpus), "tokenizer": str(tokenizer), "heldout_every": 8, "seq_len": 64},
        "objective": {"mask_share": 0.4, "smask_share": 0.2, "pack": 2},
        "optim": {"lr": 0.003, "warmup_steps": 5, "batch_size": 8, "micro_batch_size": 4,
                  "batch_warmup_start": 4, "batch_warmup_steps": 8},
    }
    for k, v in over.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict:
    e = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def glmrt(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glm_runtime.cli.main", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
