"""Options shared by several subcommands: backend selection and run config files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from glm_runtime.core.errors import GLMError
from glm_runtime.core.registry import get_backend


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="backend name (overrides GLM_BACKEND and the config file; default auto)")
    p.add_argument("--config", help="run config file (JSON or YAML) with keys such as 'backend:'")
    p.add_argument("--strict-ops", action="store_true", default=None,
                   help="fail instead of falling back to a reference op (also GLM_STRICT_OPS=1)")


def read_run_config(path: str | None) -> dict:
    """Flat run configuration: JSON, or YAML when PyYAML is installed (``key: value`` lines
    are read without it)."""
    if not path:
        return {}
    f = Path(path)
    if not f.is_file():
        raise GLMError("run config file not found", f)
    text = f.read_text()
    if f.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise GLMError(f"not valid JSON ({e})", f) from None
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise GLMError(f"not valid YAML ({str(e).splitlines()[0]})", f) from None
    else:
        data = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if ":" not in line:
                raise GLMError(f"line {n}: expected 'key: value'", f)
            k, v = line.split(":", 1)
            data[k.strip()] = v.strip().strip("'\"")
    if not isinstance(data, dict):
        raise GLMError("a run config must be a mapping of keys to values", f)
    return data


def select_backend(args):
    cfg = read_run_config(getattr(args, "config", None))
    return get_backend(args.backend, cfg.get("backend"))
