"""The `qtulu` command line: thin, no logic of its own.

Each command lives in the module named below, which exposes ``register(subparsers)`` adding its
parser (with ``set_defaults(func=...)``). Those modules keep heavy imports (torch, transformers)
inside their functions so that ``qtulu --help`` stays fast. A command is listed here only when
it works.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module): order is the order of `qtulu --help`.
COMMANDS: list[tuple[str, str]] = [
    ("demo", "qtulu.demo.run"),
    ("data", "qtulu.data.cli"),
    ("train", "qtulu.train.run"),
    ("eval", "qtulu.evals.cli"),
    ("merge", "qtulu.merge_cli"),
    ("chat", "qtulu.chat"),
    ("bench", "qtulu.bench.cli"),
    ("recipe", "qtulu.recipe_cli"),
    ("plan", "qtulu.plan.cli"),
    ("study", "qtulu.study.cli"),
    # COMMANDS-END (keep this marker: one line per command above it)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qtulu",
        description="Instruction-tune LLaMA-style models the Tulu way, with QLoRA on one GPU.",
        epilog="Errors are printed as one line (exit status 2); --debug (anywhere on the line) shows "
               "the traceback instead.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def _command_name(argv: list[str]) -> str:
    """``qtulu data build`` for the error prefix: the command words before the first option."""
    words = []
    for a in argv:
        if a.startswith("-") or len(words) == 2:
            break
        words.append(a)
    return " ".join(["qtulu", *words[:1 if not words or words[0] not in _NESTED else 2]])


# commands whose second word is a sub-command (for the error prefix)
_NESTED = {"data", "eval", "bench", "recipe"}


def main(argv: list[str] | None = None) -> int:
    """Run one command. qtulu's own errors (`QtuluError`), missing/unreadable files and a full disk
    are printed as one line on stderr with exit status 2; Ctrl-C as one line with status 130.
    ``--debug`` (accepted anywhere on the command line) lets the exception through instead."""
    from qtulu.errors import QtuluError, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    prefix = _command_name(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt as e:
        if debug:
            raise
        # a command may say what Ctrl-C left behind (the last checkpoint, the eval cells saved)
        detail = one_line(e) if e.args else ""
        print(f"{prefix}: interrupted" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 130
    except (QtuluError, OSError) as e:
        # OSError: a missing or unreadable file, a directory where a file was expected, a full disk;
        # its message names the path (and "No space left on device" for ENOSPC).
        if debug:
            raise
        print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return int(rc or 0)


def entry() -> None:
    """The ``qtulu`` console script: `main`, then a fast exit.

    With torch, transformers, peft and bitsandbytes imported, the interpreter's own teardown
    (freeing every module and object one by one) takes ~3 s on 2 cores: 10% of `qtulu demo`. Nothing
    is lost by skipping it: non-daemon threads are joined, the atexit handlers run (logging's flush,
    multiprocessing's and tempfile's cleanups, weakref finalizers) and stdout/stderr are flushed
    before `os._exit`. Every file qtulu writes is closed (and fsynced where it matters) by then.
    """
    import atexit
    import os
    import threading

    rc = main()
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
