"""The prompt format an adapter was trained with is recorded and is what chat and eval use by default."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from qtulu.adapters.files import recorded_chat_format
from qtulu.errors import AdapterError


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_with_two_adapters):
    root = tmp_path_factory.mktemp("fmt")
    base, dirs = base_with_two_adapters(root)
    return base, dirs


def _with_format(src, dst, fmt):
    """A copy of adapter ``src`` whose recorded recipe says ``data.chat_format: fmt`` (qtulu.json is not hashed)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "qtulu.json").read_text())
    meta["recipe"]["data"] = {"chat_format": fmt}
    (dst / "qtulu.json").write_text(json.dumps(meta))
    return dst


def test_the_recorded_format_is_read(trained, tmp_path):
    _, dirs = trained
    tok = _with_format(dirs["first"], tmp_path / "tok", "tokenizer")
    tulu = _with_format(dirs["second"], tmp_path / "tulu", "tulu")
    assert recorded_chat_format([tok]) == "tokenizer"
    assert recorded_chat_format([tulu]) == "tulu"
    assert recorded_chat_format([dirs["first"]]) == "tulu"  # a recipe without data.chat_format: the default
    plain = tmp_path / "plain"
    plain.mkdir()
    assert recorded_chat_format([plain]) is None  # a plain PEFT adapter records nothing
    with pytest.raises(AdapterError, match="different prompt formats.*--chat-format"):
        recorded_chat_format([tok, tulu])


def test_eval_refuses_adapters_of_two_formats_without_a_choice(trained, tmp_path):
    base, dirs = trained
    tok = _with_format(dirs["first"], tmp_path / "tok", "tokenizer")
    tulu = _with_format(dirs["second"], tmp_path / "tulu", "tulu")
    data = tmp_path / "data"
    data.mkdir()
    r = subprocess.run([sys.executable, "-m", "qtulu.cli", "eval", "--model", str(base), "--adapter", str(tok),
                        "--adapter", str(tulu), "--tasks", "gsm8k", "--data-dir", str(data), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "different prompt formats" in last and "tok (tokenizer)" in last and "tulu (tulu)" in last
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
