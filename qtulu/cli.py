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
    ("demo", "qtulu.demo"),
    ("data", "qtulu.data.cli"),
    ("train", "qtulu.train"),
    ("eval", "qtulu.evals.cli"),
    ("merge", "qtulu.merge"),
    ("chat", "qtulu.chat"),
    ("bench", "qtulu.bench.cli"),
    # COMMANDS-END (keep this marker: one line per command above it)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qtulu",
        description="Instruction-tune LLaMA-style models the Tulu way, with QLoRA on one GPU.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
