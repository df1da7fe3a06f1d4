"""``glmrt``: entry point, and the one place where errors become what the user sees.

A subcommand module defines ``NAME``, ``HELP``, ``EXAMPLE``, ``add_arguments(parser)`` and
``run(args) -> int``. Every way a command can fail ends here as one line on stderr:

* a bad option (argparse) or a problem the user caused (:class:`GLMError`: a bad path,
  file, config value or checkpoint) or their system refused (``OSError``: no permission,
  a read-only or full file system): ``glmrt CMD: error: ...``, exit status 2;
* one rank of a launched job failed while this one ran: the line of
  :func:`glm_runtime.parallel.bootstrap.fail_fast` (it names the failed rank when the
  launcher knows it), exit status 3;
* anything else is a bug: ``glmrt CMD: internal error: ...`` plus a hint to rerun with
  ``--debug``, exit status 1; Ctrl-C is exit status 130.

``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from glm_runtime import disable_torch_device_autoload

disable_torch_device_autoload()  # before any subcommand module imports torch

from glm_runtime.core.errors import GLMError  # noqa: E402
from glm_runtime.core.files import describe_os_error  # noqa: E402
from glm_runtime.parallel.bootstrap import fail_fast, finish  # noqa: E402

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


class UsageError(GLMError):
    """A command line argparse refused."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its refusals as one line: its own ``error`` prints the usage
    and the message on several lines and exits on the spot."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="glmrt", description="glm-runtime: run, convert and inspect GLM models "
                       "on any backend.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command_name", metavar="COMMAND")
    for modname in COMMANDS:
        mod = importlib.import_module(modname)
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                            epilog=f"example:\n  {mod.EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def one_line(text: str) -> str:
    """``text`` on one line: a message may quote a file's or a library's multi-line text."""
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _command_name(argv: list[str]) -> str:
    """The subcommand named on a command line argparse refused (for the error's prefix)."""
    names = {importlib.import_module(m).NAME for m in COMMANDS}
    return next((a for a in argv if a in names), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        prog = " ".join(("glmrt", _command_name(argv))).strip()
        print(f"{prog}: error: {one_line(e)} (see '{prog} --help')", file=sys.stderr)
        return 2
    # --debug: the project's own debug logs (backend choice, cache hits, op tables); other
    # libraries' stay at warnings (the ONNX exporter alone logs thousands of lines)
    logging.basicConfig(level=logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.debug:
        logging.getLogger("glm_runtime").setLevel(logging.DEBUG)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    prefix = f"glmrt {args.command_name}"
    try:
        with fail_fast(prefix):
            return finish(int(args._run(args) or 0))  # a rank of a job leaves here (bootstrap.finish)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except (GLMError, OSError) as e:
        if args.debug:
            raise
        print(f"{prefix}: error: {one_line(describe_os_error(e) if isinstance(e, OSError) else e)}",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if args.debug:
            raise
        print(f"{prefix}: internal error: {type(e).__name__}: {one_line(e)[:500]} (a bug; run with --debug for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
