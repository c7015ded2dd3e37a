"""A new user's first hour (issue 19): a typo fails before the base is loaded, Ctrl-C leaves things
consistent, adapters carry their run's name, and presets make any recipe runnable on a CPU.

The "base" in the early-error tests is a model directory that looks right (config.json, tokenizer,
a *.safetensors file) but whose weights cannot be read: any command that loaded it would fail with
a safetensors error. Each test asserts the error it gets is the early one (and prints how long it
took; timings are not asserted)."""

from __future__ import annotations

import io
import json
import time

import pytest

from qtulu.demo.synthetic import make_examples, packed_toy_dataset, toy_recipe, write_jsonl
from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama


@pytest.fixture(scope="module")
def unloadable_base(tmp_path_factory):
    """config.json + tokenizer + a model.safetensors of garbage: every check but the load passes."""
    root = tmp_path_factory.mktemp("unloadable")
    base = root / "base"
    build_tiny_llama(0).config.save_pretrained(base)
    build_char_tokenizer().save_pretrained(base)
    (base / "model.safetensors").write_bytes(b"\xff" * 4096)  # a load would fail: not a safetensors header
    return base


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A genuine qtulu adapter (its base is another, tiny one: the match is checked after the load)."""
    import torch

    from qtulu.adapters.store import save_adapter
    from qtulu.model.load import attach_lora, base_info, load_base

    root = tmp_path_factory.mktemp("adapter")
    model, _ = load_base(build_tiny_llama(0), quantize=None, compute_dtype=torch.float32, device="cpu")
    peft_model = attach_lora(model, toy_recipe().lora)
    return save_adapter(peft_model, root / "adapter", base_info=base_info(peft_model), name="toy")


def _cli(argv, capsys) -> tuple[int, str, float]:
    from qtulu.cli import main

    t0 = time.perf_counter()
    rc = main(argv)
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    print(f"{' '.join(argv[:2])}: {took:.2f}s: {err.strip()}")
    return rc, err, took


def _recipe(tmp_path, base, rows: str | None = None) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "rows.jsonl"
    if rows is None:
        write_jsonl(make_examples("upper", 20, split="train", seed=0), src)
    else:
        src.write_text(rows)
    path = tmp_path / "r.yaml"
    path.write_text("name: early\nsources:\n  - {name: s, format: messages, path: rows.jsonl}\n"
                    f"model: {{base: {base}, compute_dtype: float32}}\n"
                    "train: {max_steps: 1, gradient_accumulation_steps: 1, save_steps: 0}\n")
    return str(path)


def test_train_checks_recipe_name_base_and_data_before_loading_the_base(unloadable_base, tmp_path, capsys):
    recipe = _recipe(tmp_path, unloadable_base)
    out = ["--output-dir", str(tmp_path / "out"), "--no-progress"]
    rc, err, _ = _cli(["train", recipe, "-o", "train.learning_rat=1e-4", *out], capsys)
    assert rc == 2 and "train.learning_rat" in err and "unknown key" in err
    rc, err, _ = _cli(["train", recipe, "--name", "base", *out], capsys)
    assert rc == 2 and "reserved" in err
    rc, err, _ = _cli(["train", recipe, "-o", "model.base=/no/such/base", *out], capsys)
    assert rc == 2 and "/no/such/base: not found" in err
    # a bad row is found by the data build, which now runs before the base is loaded
    bad = _recipe(tmp_path / "bad", unloadable_base, rows='{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1}\n')
    rc, err, _ = _cli(["train", bad, *out], capsys)
    assert rc == 2 and "rows.jsonl" in err and "safetensors" not in err.lower(), err
    # with everything else right, the garbage weights are what fails: the checks above came first
    rc, err, _ = _cli(["train", recipe, *out], capsys)
    assert rc == 2 and ("safetensors" in err.lower() or "header" in err.lower()), err


def test_eval_checks_tasks_options_data_and_adapters_before_loading(unloadable_base, adapter_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_jsonl(make_examples("upper", 5, split="test", seed=0), data / "upper_test.jsonl")
    base = ["eval", "--model", str(unloadable_base), "--data-dir", str(data), "--out", str(tmp_path / "o")]
    rc, err, _ = _cli([*base, "--tasks", "synthetic_upper", "-o", "synthetic_upper.max_new_token=4"], capsys)
    assert rc == 2 and "unknown option 'max_new_token'" in err and "max_new_tokens" in err
    rc, err, _ = _cli([*base, "--tasks", "synthetic_upper", "-o", "gsm8.max_new_tokens=4"], capsys)
    assert rc == 2 and "unknown task" in err and "gsm8" in err
    rc, err, _ = _cli([*base, "--tasks", "synthetic_successor"], capsys)  # its data file is missing
    assert rc == 2 and "successor_test.jsonl" in err
    rc, err, _ = _cli([*base[:4], str(tmp_path / "nodata"), *base[5:], "--tasks", "synthetic_upper"], capsys)
    assert rc == 2 and "--data-dir" in err
    rc, err, _ = _cli([*base, "--tasks", "synthetic_upper", "--adapter", str(tmp_path / "missing")], capsys)
    assert rc == 2 and "adapter directory not found" in err
    rc, err, _ = _cli([*base, "--tasks", "synthetic_upper", "--adapter", str(adapter_dir),
                       "--adapter", str(adapter_dir)], capsys)
    assert rc == 2 and "two adapters are named ['toy']" in err
    rc, err, _ = _cli([*base, "--tasks", "synthetic_upper", "--adapter", str(adapter_dir)], capsys)
    assert rc == 2 and ("safetensors" in err.lower() or "header" in err.lower()), err  # only now the load


def test_chat_and_merge_check_before_loading(unloadable_base, adapter_dir, tmp_path, capsys):
    rc, err, _ = _cli(["chat", "--model", str(unloadable_base), "--adapter", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "adapter directory not found" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in adapter_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = bytearray((broken / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1  # one flipped byte
    (broken / "adapter_model.safetensors").write_bytes(bytes(data))
    rc, err, _ = _cli(["chat", "--model", str(unloadable_base), "--adapter", str(broken)], capsys)
    assert rc == 2 and "checksum mismatch" in err
    merge = ["merge", "--model", str(unloadable_base), "--out", str(tmp_path / "m")]
    rc, err, _ = _cli([*merge, "--adapter", str(adapter_dir), "--adapter", f"b={adapter_dir}", "--method", "ties"], capsys)
    assert rc == 2 and "needs a density" in err
    rc, err, _ = _cli([*merge, "--adapter", str(adapter_dir), "--adapter", f"b={adapter_dir}", "--weights", "1"], capsys)
    assert rc == 2 and "1 weights for 2 adapters" in err
    rc, err, _ = _cli([*merge, "--adapter", str(adapter_dir), "--adapter", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "adapter directory not found" in err
    assert not (tmp_path / "m").exists()


# --- Ctrl-C -----------------------------------------------------------------------------------------


class _Stdin(io.StringIO):
    """Piped input that raises KeyboardInterrupt (Ctrl-C at the prompt) before the lines at ``at``."""

    def __init__(self, text: str, at: set[int]):
        super().__init__(text)
        self.at, self.calls = at, 0

    def readline(self, *a):
        self.calls += 1
        if self.calls in self.at:
            raise KeyboardInterrupt
        return super().readline(*a)


def test_chat_ctrl_c_stops_the_reply_and_stays_open(monkeypatch):
    from qtulu import chat

    model = build_tiny_llama(0).eval()
    calls = []

    def reply(model, tok, messages, **kw):
        calls.append([m["content"] for m in messages])
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first reply is being generated
        return f"answer {len(calls)}"

    monkeypatch.setattr(chat, "reply", reply)
    out = io.StringIO()
    n = chat.run_chat(model, build_char_tokenizer(), _Stdin("first\nsecond\n/quit\n", at=set()), out)
    text = out.getvalue()
    assert n == 1 and "(reply stopped)" in text and "answer 2" in text
    assert calls[1] == ["second"]  # the stopped turn left no trace in the history

    # Ctrl-C at the prompt: a hint, the session goes on; two in a row leave
    out = io.StringIO()
    n = chat.run_chat(model, build_char_tokenizer(), _Stdin("again\n", at={1}), out)
    assert n == 1 and "Ctrl-C again" in out.getvalue()
    out = io.StringIO()
    n = chat.run_chat(model, build_char_tokenizer(), _Stdin("never read\n", at={1, 2}), out)
    assert n == 0


def test_train_ctrl_c_names_the_last_complete_checkpoint_and_resumes(tmp_path):
    from transformers import TrainerCallback

    from qtulu.train.checkpoint import check_complete
    from qtulu.train.run import train

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    recipe = toy_recipe(train={"max_steps": 4, "save_steps": 2})
    kw = dict(output_dir=tmp_path, tokenizer=build_char_tokenizer(), data=packed_toy_dataset(8, 2), progress=False)
    with pytest.raises(KeyboardInterrupt) as info:
        train(recipe, model=build_tiny_llama(0), callbacks=[CtrlC()], **kw)
    msg = str(info.value)
    assert "checkpoint-2" in msg and "resume" in msg, msg
    check_complete(tmp_path / "checkpoints" / "checkpoint-2")
    assert not (tmp_path / "adapter").exists()
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 3  # the steps done are on disk
    res = train(recipe, model=build_tiny_llama(0), **kw)  # the same call resumes from checkpoint-2
    assert res.resumed_from.endswith("checkpoint-2") and res.global_step == 4
    assert json.loads((tmp_path / "adapter" / "qtulu.json").read_text())["name"] == "toy"


def test_ctrl_c_one_line_with_what_was_left(monkeypatch, capsys):
    from qtulu import cli

    def interrupted(args):
        raise KeyboardInterrupt("stopped after 3 optimizer step(s); last complete checkpoint X")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["demo"].set_defaults(func=interrupted)
    assert cli.main(["demo"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qtulu demo: interrupted: stopped after 3 optimizer step(s); last complete checkpoint X"]


# --- adapter names ----------------------------------------------------------------------------------


def test_adapters_are_named_after_their_run(adapter_dir, tmp_path):
    from qtulu.adapters.store import parse_adapter_spec

    assert parse_adapter_spec(str(adapter_dir)) == ("toy", adapter_dir)  # the run name, not "adapter"
    assert parse_adapter_spec(f"mine={adapter_dir}")[0] == "mine"  # NAME=DIR still renames
    other = tmp_path / "plain"
    other.mkdir()
    (other / "qtulu.json").write_text(json.dumps({"name": "base", "files": {}}))  # an unusable name: the folder's
    assert parse_adapter_spec(str(other))[0] == "plain"


# --- presets ----------------------------------------------------------------------------------------


def test_smoke_preset_applies_to_every_shipped_recipe():
    from qtulu.presets import PRESETS, PresetError, preset_overrides
    from qtulu.recipes import list_recipes, load_recipe

    smoke = PRESETS["smoke"]
    for name in list_recipes():
        r = load_recipe(name, preset_overrides("smoke", name) + ["train.max_steps=7"])
        assert r.train.gradient_accumulation_steps == 1 and not r.train.gradient_checkpointing, name
        assert r.model.compute_dtype == "float32" and r.data.max_seq_len == smoke.settings["data.max_seq_len"], name
        assert r.train.save_steps == 5 and r.train.max_steps == 7, name  # the user's -o wins over the preset
        assert all(s.count == smoke.per_source["count"] for s in r.sources), name
    with pytest.raises(PresetError, match="unknown preset 'smok'; presets: cpu, smoke"):
        preset_overrides("smok", "dolly")
