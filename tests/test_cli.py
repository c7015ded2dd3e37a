"""The CLI's error contract: qtulu's errors and file errors are one line on stderr with exit
status 2; Ctrl-C is one line with status 130; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import subprocess
import sys


from qtulu.cli import main
from qtulu.errors import QtuluError, one_line


def test_qtulu_errors_share_one_base():
    from qtulu.adapters.store import AdapterError
    from qtulu.data.errors import BadRow, DataError
    from qtulu.evals.sandbox import CodeExecutionRefused
    from qtulu.adapters.export import ExportError
    from qtulu.adapters.merge import MergeError
    from qtulu.model.load import ModelLoadError
    from qtulu.recipes import RecipeError
    from qtulu.train.run import TrainError

    for cls in (AdapterError, BadRow, DataError, CodeExecutionRefused, ExportError, MergeError, ModelLoadError,
                RecipeError, TrainError):
        assert issubclass(cls, QtuluError), cls
    assert issubclass(RecipeError, ValueError)  # the builtin base is kept for callers' `except ValueError`


def test_one_line_folds_newlines_and_key_error_quotes():
    assert one_line(ValueError("a\n  b\n")) == "a b"
    assert one_line(KeyError("no task 'x'")) == "no task 'x'"


def test_missing_recipe_is_one_line_exit_2(capsys, tmp_path):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtulu train: error: ") and "nope.yaml" in err and err.count("\n") == 1


def test_directory_as_recipe_is_one_line_exit_2(capsys, tmp_path):
    assert main(["data", "build", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtulu data build: error: ") and str(tmp_path) in err and err.count("\n") == 1


def test_interrupt_is_one_line_130(capsys, monkeypatch):
    import qtulu.train.run as train_mod

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_cli", interrupted)  # main() builds its parser after this
    assert main(["train", "x"]) == 130
    assert capsys.readouterr().err == "qtulu train: interrupted\n"


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qtulu.cli", "--debug", "train", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "qtulu.cli", "train", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_fast_exit_keeps_output_exit_code_and_atexit_work(tmp_path):
    """`entry` skips the interpreter's teardown with os._exit: piped stdout must still arrive whole,
    the exit code must be main()'s, and atexit handlers (logging's flush, tempfile cleanups) must run."""
    proc = subprocess.run([sys.executable, "-m", "qtulu", "recipe", "list"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.count("\n") >= 3 and proc.stdout.endswith("\n")
    marker = tmp_path / "atexit-ran"
    code = ("import atexit, sys; from pathlib import Path; "
            f"atexit.register(lambda: Path({str(marker)!r}).write_text('ok')); "
            "sys.argv = ['qtulu', 'train', 'nope.yaml']; import qtulu.cli; qtulu.cli.entry()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("qtulu train:") and marker.read_text() == "ok"
