"""`egstalker` command line: a thin layer over each stage's Python API.

Each subcommand lives in its stage's `cli` module, which exposes `HELP`, `add_arguments(parser)` and
`run(args) -> int`. Those modules import heavy libraries (torch, mediapipe) only inside `run`, so
`egstalker --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings
from pathlib import Path

from egstalker import __version__
from egstalker.errors import EgstalkerError, EgstalkerWarning

SUBCOMMANDS = {
    "preprocess": "egstalker.preprocess.cli",
    "train": "egstalker.train.cli",
    "render": "egstalker.render.cli",
    "run": "egstalker.run_cli",
    "eval": "egstalker.evaluate.cli",
    "serve": "egstalker.serve.cli",
    "client": "egstalker.serve.client_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egstalker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"egstalker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # stage not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def interrupted_note(args: argparse.Namespace) -> str:
    """What an interrupted command leaves behind, and how to go on."""
    if args.command == "train":
        if any(Path(args.output).glob("checkpoints/step_*.pt")):
            return "run the same command with --resume to continue"
        return "nothing was trained yet; run the same command again"
    if args.command == "preprocess":
        return "run the same command again to continue"
    if args.command == "run":
        return "run the same command again to continue (finished stages are reused)"
    if args.command == "eval":  # the report is written at the end: an earlier one is left as it was
        return "no report or metrics were written" if getattr(args, "report", None) else "nothing was written"
    partial = getattr(args, "frames_dir", None)  # frames are written as they go
    return f"the video was not written; the frames so far are in {partial}" if partial else "nothing was written"


def _raised_while_interrupted(error: BaseException) -> bool:
    """Whether `error` was raised while a KeyboardInterrupt was being handled (anywhere in its context chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, with its usage line, not the top-level one
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    previous = None
    formatted = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings(args.command, formatted)
    if threading.current_thread() is threading.main_thread():
        # `kill` and service managers stop with SIGTERM: clean up as on Ctrl-C (temporary files, workers)
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return int(args._run(args) or 0)
    except EgstalkerError as e:
        print(f"egstalker {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"egstalker {args.command}: interrupted; {interrupted_note(args)}", file=sys.stderr)
        return 130
    except Exception as e:
        if not _raised_while_interrupted(e):
            raise
        # e.g. SIGTERM to the whole process group: the DataLoader's workers die of it too, and torch reports them
        # while the interrupt unwinds; that is part of the interrupt, not an error of its own
        print(f"egstalker {args.command}: interrupted; {interrupted_note(args)}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatted
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line_warnings(command: str, fallback):
    """A warnings.formatwarning that writes egstalker's own warnings as one line, `egstalker COMMAND: warning:
    ...` (Python's format adds the source file, line and code, which tell a user nothing); other packages'
    warnings keep their format."""
    def format_warning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, EgstalkerWarning):
            return f"egstalker {command}: warning: {message}\n"
        return fallback(message, category, filename, lineno, line)

    return format_warning
