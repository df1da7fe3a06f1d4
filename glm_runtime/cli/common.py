"""Options shared by several subcommands: backend selection, config files, checked options."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from glm_runtime.core.errors import GLMError
from glm_runtime.core.files import read_json, read_text
from glm_runtime.core.registry import get_backend
from glm_runtime.core.schema import OPTIONAL_TEXT, arg_type, check_fields, from_mapping, integer, spec

RANKS = arg_type(integer(1, 4096))  # --tp / --pp: a number of ranks


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="backend name (overrides GLM_BACKEND and the config file; default auto)")
    p.add_argument("--config", help="run config file (JSON or YAML) with keys such as 'backend:'")
    p.add_argument("--strict-ops", action="store_true", default=None,
                   help="fail instead of falling back to a reference op (also GLM_STRICT_OPS=1)")


def show_progress() -> bool:
    """Progress bars only on a terminal: in a log or a pipe they are noise, and they would
    come before a one-line error."""
    return sys.stderr.isatty()


def read_config_file(path: str | Path, what: str = "config"):
    """A JSON or YAML file's value (YAML when PyYAML is installed; flat ``key: value`` lines
    are read without it), read with the size limit of any config."""
    f = Path(path)
    if f.suffix == ".json":
        return read_json(f, what)
    text = read_text(f, what)
    try:
        import yaml
    except ImportError:
        return _flat_yaml(text, f)
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise GLMError(f"{what} file is not valid YAML ({str(e).splitlines()[0]})", f) from None
    except ValueError as e:  # a value YAML cannot build (an integer beyond Python's digit limit)
        raise GLMError(f"{what} file is not a {what}: {str(e)[:200]}", f) from None
    except RecursionError:
        raise GLMError(f"{what} file is nested too deeply to be a {what}", f) from None


def _flat_yaml(text: str, f: Path) -> dict:
    data = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if ":" not in line:
            raise GLMError(f"line {n}: expected 'key: value'", f)
        k, v = (x.strip() for x in line.split(":", 1))
        try:
            data[k] = json.loads(v)  # numbers, true/false, null, quoted strings
        except json.JSONDecodeError:
            data[k] = v.strip("'\"")
    return data


@dataclass
class RunConfig:
    """A run config file (``--config run.yaml`` of generate and launch): which backend, and
    which model when the command line names none."""

    backend: str | None = spec(OPTIONAL_TEXT, None)
    model: str | None = spec(OPTIONAL_TEXT, None)

    def __post_init__(self):
        check_fields(self, "run config")


def read_run_config(path: str | None) -> RunConfig:
    if not path:
        return RunConfig()
    return from_mapping(RunConfig, read_config_file(path, "run config"), "run config", path)


def select_backend(args):
    return get_backend(args.backend, read_run_config(getattr(args, "config", None)).backend)
