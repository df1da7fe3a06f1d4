"""``glmrt cache``: the exports the onnx backend made on demand (list, or clear them)."""
from __future__ import annotations

from glm_runtime.backends.onnx import cache

NAME = "cache"
HELP = "list or clear the ONNX exports the onnx backend keeps for checkpoints it was given"
EXAMPLE = "glmrt cache --clear"


def add_arguments(p):
    p.add_argument("--clear", action="store_true", help="remove every cached export")


def run(args) -> int:
    root = cache.cache_root()
    if args.clear:
        print(f"removed {cache.clear()} cached export(s) from {root}")
        return 0
    entries = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    print(f"{root}: {len(entries)} cached export(s)")
    for p in entries:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        print(f"  {p.name}  {size / 2**20:.1f} MiB")
    return 0
