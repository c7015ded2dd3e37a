"""The `qtulu` command line: thin, no logic of its own.

Each command lives in the module named below, which exposes ``register(subparsers)`` adding its
parser (with ``set_defaults(func=...)``). Those modules keep heavy imports (torch, transformers)
inside their functions so that ``qtulu --help`` stays fast. A command is listed here only when
it works.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
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


class UsageError(Exception):
    """argparse's complaint about the command line, raised instead of its usage text + exit."""

    def __init__(self, message: str, parser: argparse.ArgumentParser):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors reach `main` (one line, a "did you mean", exit 2) instead of
    printing the usage block; every sub-command's parser is one too (argparse builds them with the
    parent's class)."""

    def error(self, message: str):
        raise UsageError(message, self)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
# ... and those that do nothing without one (`qtulu eval` alone evaluates)
_NEEDS_SUB = {"data", "bench", "recipe"}


def _sub_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _innermost(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub-)command named by ``argv``'s leading words (``data build`` -> its parser)."""
    for word in argv:
        if word.startswith("-"):
            continue
        sub = _sub_parsers(parser).get(word)
        if sub is None:
            break
        parser = sub
    return parser


def _close(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def usage_line(err: UsageError, parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """argparse's message as one line, with a "did you mean" for a mistyped command or option and
    where to read the usage (argparse's own error prints a usage block and no suggestion)."""
    target = _innermost(parser, argv)
    msg = " ".join(str(err).split())
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", msg)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2))
        what = "command" if set(choices) == set(_sub_parsers(target)) else "choice"
        head = "" if what == "command" else msg[:m.start()]
        msg = f"{head}unknown {what} {m.group(1)!r}{_close(m.group(1), choices)}; choose from {', '.join(choices)}"
    options = [o for o in target._option_string_actions if o.startswith("--")]
    def known(opt: str) -> bool:  # argparse also takes a unique abbreviation (--pre for --preset)
        return opt in options or (target.allow_abbrev and sum(o.startswith(opt) for o in options) == 1)

    unknown = [a.split("=", 1)[0] for a in argv if a.startswith("--") and not known(a.split("=", 1)[0])]
    if unknown and not m:
        # an unknown option explains the other complaints (a value taken as a positional, a
        # required argument missing): name it first, with the option it most likely meant
        msg = f"unknown option {unknown[0]}{_close(unknown[0], options)}" + ("" if "unrecognized" in msg else f"; {msg}")
    return f"{msg} (see `{target.prog} --help`)"


def _own_dirs() -> tuple[str, ...]:
    """Where qtulu's code lives (evals/ and kernels/ are symlinked into the package in a checkout)."""
    import os

    pkg = os.path.dirname(os.path.realpath(__file__))
    return tuple({os.path.realpath(os.path.join(pkg, d)) + os.sep for d in ("", "evals", "kernels")})


class ThirdPartyWarnings:
    """Keeps the libraries' warnings off the console for one command; `summary` is one line.

    bitsandbytes logs, when imported on a CPU with AVX512-BF16, that HF `kernels` refused an
    unverified kernel repository: "Set trust_remote_code=True or add the repository ID to the
    trust_remote_code allowlist ..." (logger ``bitsandbytes.backends.cpu.ops``, printed by logging's
    last-resort handler as no handler is configured). A newcomer reads it as an instruction to lower
    a security setting; qtulu does not need that kernel. Such lines (warnings from the `logging`
    root and from `warnings.warn` whose origin is not qtulu's code) are kept, with their full text,
    for the run's log; qtulu's own warnings and log records print as before.
    """

    def __init__(self):
        import logging

        self.records: list[tuple[str, str]] = []  # (where from, full text)
        self._own = _own_dirs()
        root = logging.getLogger()
        self._echo_own = not root.handlers  # with no handler, logging's last resort printed them
        self._handler = logging.Handler(logging.WARNING)
        self._handler.emit = self._emit
        self._root = root

    def _emit(self, record) -> None:
        if record.name == "qtulu" or record.name.startswith("qtulu."):
            if self._echo_own and not self._handled(record.name):
                print(record.getMessage(), file=sys.stderr)
            return
        self.records.append((record.name, f"[{record.levelname.lower()}] {record.name}: {record.getMessage()}"))

    def _handled(self, name: str) -> bool:
        """Whether a handler other than this one sees ``name``'s records (then logging's last resort
        would not have printed them either)."""
        import logging

        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None:
            if any(h is not self._handler for h in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        import os

        if os.path.realpath(filename).startswith(self._own):
            self._show(message, category, filename, lineno, file, line)
        else:
            self.records.append((category.__name__, f"[{category.__name__}] {filename}:{lineno}: {message}"))

    def __enter__(self):
        import warnings

        self._root.addHandler(self._handler)
        self._show = warnings.showwarning
        warnings.showwarning = self._showwarning
        return self

    def __exit__(self, *exc):
        import warnings

        self._root.removeHandler(self._handler)
        warnings.showwarning = self._show
        return False

    def write(self, argv: list[str], where: "str | None") -> "str | None":
        """Append the full text to ``where``/warnings.log (the run's folder), else to the user's
        state folder (``$XDG_STATE_HOME/qtulu/warnings.log``); the path written, None if nothing was."""
        import os
        import shlex
        import time

        from qtulu.files import WARNINGS_LOG

        if not self.records:
            return None
        if where and os.path.isdir(where):
            log = os.path.join(where, WARNINGS_LOG)
        else:
            state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
            log = os.path.join(state, "qtulu", "warnings.log")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        text = f"# {stamp} {shlex.join(['qtulu', *argv])}\n" + "".join(text.rstrip() + "\n" for _, text in self.records)
        try:
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "a", encoding="utf-8") as f:  # a log: appended, one block per run
                f.write(text)
        except OSError:
            return None
        return log

    def summary(self, log: "str | None") -> str:
        n = len(self.records)
        sources = ", ".join(dict.fromkeys(src for src, _ in self.records))
        where = f"full text in {log}" if log else "no log could be written"
        return f"qtulu: {n} warning{'s' if n != 1 else ''} from the libraries, not qtulu's to fix ({sources}): {where}"


def _run_dir(args: argparse.Namespace) -> "str | None":
    """The folder of the command's run, for its warnings.log: one a command sets (``args.run_dir``),
    its ``--output-dir`` / ``--out`` where that is a run folder (not a model or adapter dir)."""
    if getattr(args, "run_dir", None):
        return str(args.run_dir)
    if args.command in ("merge", "data", "chat", "recipe", "plan"):
        return None  # their --out is an artefact with a file manifest (or they write none)
    if args.command == "study" and (args.plan or not args.out):
        return None if args.plan else _study_out(args.study)  # --plan writes nothing in the study's folder
    if args.command == "train" and not getattr(args, "output_dir", None):
        name = getattr(args, "name", None) or _recipe_name(args.recipe)
        return f"runs/{name}" if name else None
    return getattr(args, "output_dir", None) or getattr(args, "out", None)


def _study_out(study: str) -> "str | None":
    try:
        from qtulu.study.load import default_out

        return str(default_out(study))
    except Exception:  # the study file did not load: the run failed before naming its folder
        return None


def _recipe_name(recipe: str) -> str:
    try:
        from qtulu.recipes import load_recipe

        return load_recipe(recipe).name
    except Exception:  # the run failed before naming itself: its warnings go to the state folder
        return ""


def main(argv: list[str] | None = None) -> int:
    """Run one command. qtulu's own errors (`QtuluError`), missing/unreadable files and a full disk
    are printed as one line on stderr with exit status 2; Ctrl-C as one line with status 130.
    ``--debug`` (accepted anywhere on the command line) lets the exception through instead."""
    from qtulu.errors import QtuluError, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        if debug:
            raise
        print(f"{_innermost(parser, argv).prog}: error: {usage_line(e, parser, argv)}", file=sys.stderr)
        return 2
    args.debug = debug
    target = _innermost(parser, argv)
    if args.command in _NEEDS_SUB and target.prog == f"qtulu {args.command}":
        # `qtulu data` alone: the usage block was a 20-line error; say what is missing in one
        print(f"{target.prog}: error: name a command: {', '.join(_sub_parsers(target))} "
              f"(see `{target.prog} --help`)", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    prefix = _command_name(argv)
    captured = ThirdPartyWarnings()

    def warnings_line() -> None:
        # before the command's last line: a failure's one-line error stays the last line on stderr
        if captured.records:
            print(captured.summary(captured.write(argv, _run_dir(args))), file=sys.stderr)

    try:
        with captured:
            rc = args.func(args)
    except KeyboardInterrupt as e:
        if debug:
            raise
        # a command may say what Ctrl-C left behind (the last checkpoint, the eval cells saved)
        detail = one_line(e) if e.args else ""
        warnings_line()
        print(f"{prefix}: interrupted" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 130
    except (QtuluError, OSError) as e:
        # OSError: a missing or unreadable file, a directory where a file was expected, a full disk;
        # its message names the path (and "No space left on device" for ENOSPC).
        if debug:
            raise
        warnings_line()
        print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BaseException:
        warnings_line()  # a bug's traceback follows; the libraries' warnings are still in the log
        raise
    warnings_line()
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
