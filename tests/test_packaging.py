"""The checkout root is a safe place to start Python: its top-level kernels/ and evals/ folders are
never imported as top-level packages (transformers imports Hugging Face's `kernels`), and qtulu's
own modules are found through the package (qtulu.kernels, qtulu.evals, qtulu/builtin_recipes).
Each check is a subprocess started at the checkout root, as a user's shell would start it.
The built wheel and sdist are checked by .ci/wheel (CI), which installs the wheel in a fresh venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _at_root(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_python_at_the_checkout_root_imports_the_ecosystem_and_qtulu():
    code = ("import transformers, peft, qtulu, transformers.modeling_utils, kernels, qtulu.kernels.nf4, "
            "qtulu.evals.runner; print(kernels.__file__); print(qtulu.kernels.nf4.__file__)")
    p = _at_root(sys.executable, "-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    hf_kernels, nf4 = p.stdout.strip().splitlines()[-2:]
    assert not Path(hf_kernels).resolve().is_relative_to(REPO), hf_kernels  # Hugging Face's, not ours
    assert Path(nf4).resolve() == REPO / "kernels" / "nf4.py"


def test_top_level_folders_are_not_packages_of_their_own():
    for folder in ("kernels", "evals", "recipes", "benchmarks", "tests"):
        assert not (REPO / folder / "__init__.py").exists(), folder


def test_python_dash_m_cli_at_the_root():
    p = _at_root(sys.executable, "-m", "qtulu.cli", "recipe", "list")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "dolly" in p.stdout.split()


def test_python_dash_m_pytest_at_the_root_collects():
    p = _at_root(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                 "tests/kernels/test_nf4.py")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "tests collected" in p.stdout or "collected" in p.stdout


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_readme_launchers_start_qtulu_at_the_root(launcher):
    """`torchrun ... -m qtulu.cli` and `accelerate launch ... -m qtulu.cli`, as the README writes them
    (here on `recipe list`, one process: the import path is what is under test)."""
    exe = shutil.which(launcher)
    if exe is None:
        pytest.skip(f"{launcher} is not installed")
    argv = [exe, "--nproc_per_node", "1"] if launcher == "torchrun" else [exe, "launch", "--cpu", "--num_processes", "1"]
    p = _at_root(*argv, "-m", "qtulu.cli", "recipe", "list")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "dolly" in p.stdout.split()


def test_shipped_recipes_are_read_as_package_resources():
    import importlib.resources

    from qtulu.recipes import REPO_RECIPES_DIR, list_recipes

    root = importlib.resources.files("qtulu") / "builtin_recipes"
    assert REPO_RECIPES_DIR == Path(str(root))
    assert set(list_recipes()) == {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    assert (root / "settings" / "open_instruct_qlora_2308.yaml").is_file()
    assert (root / "studies" / "demo.yaml").is_file()
