"""``glmrt``: entry point and error handling shared by every subcommand.

A subcommand module defines ``NAME``, ``HELP``, ``EXAMPLE``, ``add_arguments(parser)`` and
``run(args) -> int``. Errors the user caused (:class:`GLMError`) print as one line and
exit with status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from glm_runtime import disable_torch_device_autoload

disable_torch_device_autoload()  # before any subcommand module imports torch

from glm_runtime.core.errors import GLMError  # noqa: E402

COMMANDS = [
    "glm_runtime.cli.generate",
    "glm_runtime.cli.convert",
    "glm_runtime.cli.quantize",
    "glm_runtime.cli.backends",
    "glm_runtime.cli.doctor",
    "glm_runtime.cli.train",
    "glm_runtime.cli.plot",
    "glm_runtime.cli.export_onnx",
    "glm_runtime.cli.cache",
    "glm_runtime.cli.serve",
    "glm_runtime.cli.chat",
    "glm_runtime.cli.launch",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmrt", description="glm-runtime: run, convert and inspect GLM models "
                                "on any backend.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for modname in COMMANDS:
        mod = importlib.import_module(modname)
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                            epilog=f"example:\n  {mod.EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except GLMError as e:
        if args.debug:
            raise
        print(f"glmrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"glmrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
