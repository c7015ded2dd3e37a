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


# ---- issue 28: argparse's errors, --set, third-party warnings, missing demo artefacts


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "usage:" not in err and not captured.out, err
    return err.strip()


def test_argparse_errors_are_one_line_with_did_you_mean(capsys):
    err = _one_line_error(capsys, ["trian"])
    assert err.startswith("qtulu: error: unknown command 'trian' (did you mean 'train'?)"), err
    err = _one_line_error(capsys, ["train", "--prest", "smoke", "x.yaml"])
    assert err.startswith("qtulu train: error: unknown option --prest (did you mean '--preset'?)"), err
    err = _one_line_error(capsys, ["data", "biuld"])
    assert "unknown command 'biuld' (did you mean 'build'?)" in err and "qtulu data --help" in err, err
    err = _one_line_error(capsys, ["merge", "--model", "b", "--adapter", "a", "--out", "o", "--method", "tis"])
    assert "argument --method: unknown choice 'tis' (did you mean 'ties'?)" in err, err
    err = _one_line_error(capsys, ["data"])  # no sub-command: one line, not the usage block
    assert err == "qtulu data: error: name a command: build, preview, formats (see `qtulu data --help`)", err
    err = _one_line_error(capsys, ["train", "--pre", "smoke"])  # an abbreviation argparse accepts is not "unknown"
    assert err == "qtulu train: error: the following arguments are required: recipe (see `qtulu train --help`)", err
    err = _one_line_error(capsys, ["train"])  # a missing argument: argparse's words, on one line
    assert err.startswith("qtulu train: error: the following arguments are required: recipe"), err
    err = _one_line_error(capsys, ["merge", "--metod", "ties"])  # the unknown option is named first
    assert err.startswith("qtulu merge: error: unknown option --metod (did you mean '--method'?); "
                          "the following arguments are required"), err


def test_argparse_error_with_debug_raises():
    import pytest

    from qtulu.cli import UsageError

    with pytest.raises(UsageError):
        main(["--debug", "trian"])


def test_set_errors_name_the_command_line_not_the_recipe(capsys, tmp_path):
    err = _one_line_error(capsys, ["recipe", "show", "demo", "--set", "train.lerning_rate=1"])
    assert "command line: --set train.lerning_rate=1: train.lerning_rate: unknown key" in err, err
    assert "(did you mean train.learning_rate?)" in err and "demo.yaml" not in err, err
    err = _one_line_error(capsys, ["recipe", "show", "demo", "--set", "lora.r=abc"])
    assert "command line: --set lora.r=abc: lora.r: expected int" in err and "demo.yaml" not in err, err
    # a mistake in the file itself is still blamed on the file, with or without a --set beside it
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{name: s, format: messages, path: s.jsonl}]\nmodel: {base: x}\n"
                   "train: {lerning_rate: 1}\n")
    err = _one_line_error(capsys, ["recipe", "show", str(bad), "--set", "lora.r=8"])
    assert f"{bad}: train.lerning_rate: unknown key" in err and "command line" not in err, err


def test_a_missing_demo_artefact_says_run_qtulu_demo_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: `qtulu demo` never ran here
    for argv in (["chat", "--model", "demo_out/base"],
                 ["chat", "--model", "demo_out/base", "--adapter", "demo_out/runs/upper/adapter"],
                 ["eval", "--model", "demo_out/base", "--tasks", "synthetic_upper", "--data-dir", "demo_out/data",
                  "--out", "demo_out/eval"]):
        err = _one_line_error(capsys, argv)
        assert "demo_out/" in err and "run `qtulu demo` first" in err, err
    assert not list(tmp_path.iterdir())


INJECT = '''
import importlib.abc, importlib.util, logging, sys, warnings

class _Hook(importlib.abc.MetaPathFinder):
    """When bitsandbytes is imported, emit what it emits on a CPU with AVX512-BF16 (logging, last
    resort handler) and a library FutureWarning: the same channels, on every machine."""

    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: Set trust_remote_code=True or add "
                "the repository ID to the trust_remote_code allowlist (injected)")
            warnings.warn("injected library FutureWarning", FutureWarning)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
'''


def test_library_warnings_stay_off_the_console_and_go_to_a_log(tmp_path):
    """A real `qtulu chat` (it imports bitsandbytes to load the base in NF4) in a subprocess: no
    line telling the user to change a security setting reaches stdout/stderr; one summary line does,
    and the log holds the full text."""
    import os
    import re
    from pathlib import Path

    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama, save_base

    base = save_base(build_tiny_llama(seed=0), build_char_tokenizer(), tmp_path / "base")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INJECT)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{repo}", "XDG_STATE_HOME": str(tmp_path / "state"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "qtulu.cli", "chat", "--model", str(base)], input="/quit\n",
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert "trust_remote_code" not in both and "injected" not in both, both[-3000:]
    summary = [line for line in proc.stderr.splitlines() if "from the libraries" in line]
    assert len(summary) == 1, proc.stderr[-3000:]
    m = re.search(r"qtulu: (\d+) warnings? from the libraries, not qtulu's to fix \(.*\): full text in (\S+)$",
                  summary[0].split("\r")[-1])
    assert m and int(m.group(1)) >= 2, summary
    log = Path(m.group(2))
    assert log == tmp_path / "state" / "qtulu" / "warnings.log"
    text = log.read_text()
    assert "trust_remote_code allowlist (injected)" in text and "injected library FutureWarning" in text
    assert "qtulu chat --model" in text  # each run's block names its command


def test_qtulus_own_warnings_still_show():
    import warnings

    import qtulu.files
    from qtulu.cli import ThirdPartyWarnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with ThirdPartyWarnings() as captured:
            warnings.warn_explicit("ours", UserWarning, qtulu.files.__file__, 1)
            warnings.warn_explicit("theirs", UserWarning, "/elsewhere/lib.py", 1)
    assert [str(w.message) for w in shown] == ["ours"]
    assert [src for src, _ in captured.records] == ["UserWarning"] and "theirs" in captured.records[0][1]


def test_merge_arguments_are_checked_before_torch_is_imported(tmp_path):
    import json
    import os
    from pathlib import Path

    argv = ["merge", "--model", "m", "--adapter", "a", "--adapter", "b", "--method", "ties", "--out", "o"]
    code = ("import json, sys; from qtulu.cli import main; rc = main(%r); "
            "print(json.dumps(['torch' in sys.modules, rc]))" % (argv,))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert json.loads(proc.stdout.splitlines()[-1]) == [False, 2], proc.stderr
    assert proc.stderr.startswith("qtulu merge: error: method 'ties' needs a density") and proc.stderr.count("\n") == 1


def test_the_warnings_log_goes_to_the_runs_folder():
    from argparse import Namespace

    from qtulu.cli import _run_dir

    assert _run_dir(Namespace(command="train", output_dir=None, name=None, recipe="demo")) == "runs/demo"
    assert _run_dir(Namespace(command="train", output_dir=None, name="x", recipe="demo")) == "runs/x"
    assert _run_dir(Namespace(command="train", output_dir="o", name=None, recipe="demo")) == "o"
    assert _run_dir(Namespace(command="train", output_dir=None, name=None, recipe="nope")) is None
    assert _run_dir(Namespace(command="demo", out="demo_out")) == "demo_out"
    assert _run_dir(Namespace(command="study", plan=False, out=None, study="demo")) == "studies/demo"
    assert _run_dir(Namespace(command="study", plan=True, out="s", study="demo")) is None  # --plan writes nothing
    # an adapter's or a model's folder lists its files in a manifest: never a log beside them
    assert _run_dir(Namespace(command="merge", out="m")) is None
    assert _run_dir(Namespace(command="data", out="d")) is None


def test_a_failed_run_keeps_its_error_as_the_last_line(capsys, monkeypatch, tmp_path):
    import logging

    import qtulu.train.run as train_mod
    from qtulu.errors import QtuluError

    def fails(args):
        logging.getLogger("somelib.sub").warning("Set trust_remote_code=True (from a library)")
        raise QtuluError("the run failed")

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr(train_mod, "_cli", fails)
    assert main(["train", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[-1] == "qtulu train: error: the run failed", err
    assert err[0].startswith("qtulu: 1 warning from the libraries, not qtulu's to fix (somelib.sub): full text in ")
    assert "Set trust_remote_code=True (from a library)" in (tmp_path / "qtulu" / "warnings.log").read_text()


def test_qtulus_own_log_records_print_as_before(capsys):
    import logging

    from qtulu.cli import ThirdPartyWarnings

    root = logging.getLogger()
    kept = root.handlers[:]  # pytest's capture handlers: as on a user's console, the root has none
    root.handlers.clear()
    try:
        with ThirdPartyWarnings() as captured:
            logging.getLogger("qtulu.model.base_hash").warning("ours %s", 1)
            logging.getLogger("bitsandbytes.x").warning("theirs")
    finally:
        root.handlers[:] = kept
    assert capsys.readouterr().err == "ours 1\n"
    assert [src for src, _ in captured.records] == ["bitsandbytes.x"]


def test_a_missing_base_given_by_set_is_blamed_on_the_command_line(tmp_path, capsys):
    from qtulu.cli import main

    missing = tmp_path / "no_such_base"
    assert main(["train", "demo", "--set", f"model.base={missing}", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"command line: --set model.base={missing}" in err[0], err
