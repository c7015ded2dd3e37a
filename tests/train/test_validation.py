"""Validation loss (data.validation, train.eval_steps, train.keep_best_checkpoint) and the live steps.jsonl
(tiny models, CPU, fp32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from qtulu.demo.synthetic import packed_toy_dataset, toy_recipe
from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama
from qtulu.recipes import recipe_from_dict


def _recipe(train=None, *, validation=0.25, data=None):
    t = dict(train or {})
    late = {k: t.pop(k) for k in ("eval_steps", "keep_best_checkpoint") if k in t}  # valid only with validation
    d = toy_recipe(train=t).to_dict()
    d["data"]["validation"] = validation
    d["data"].update(data or {})
    d["train"].update(late)
    return recipe_from_dict(d)


def _train(recipe, out, data, **kw):
    from qtulu.train.run import train

    kw.setdefault("resume", "never")
    return train(recipe, output_dir=out, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(), data=data,
                 progress=False, **kw)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _segments(dataset):
    """[(input_ids, labels)] of every example of packed rows, row by row."""
    out = []
    for row in dataset:
        start = 0
        for n in row["seq_lens"]:
            out.append((tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n])))
            start += n
    return out


# --------------------------------------------------------------------------------------------
# the split


def test_fraction_split_holds_out_whole_examples_deterministically():
    from qtulu.train.validation import ValidationError, split_fraction

    data = packed_toy_dataset(20, 3, seed=5)  # 60 examples
    train_rows, val_rows, info = split_fraction(data, 0.2, seed=7, max_seq_len=64)
    every, tr, va = _segments(data), _segments(train_rows), _segments(val_rows)
    assert len(va) == 12 and len(tr) == 48
    assert sorted(tr + va) == sorted(every)  # whole examples, none lost, none duplicated
    assert not set(va) & set(tr)
    assert max(sum(r["seq_lens"]) for r in train_rows) <= 64  # packed anew, within max_seq_len
    assert info["validation"]["examples"] == 12 and info["train"]["examples"] == 48
    assert info["validation"]["supervised_tokens"] == sum(np.count_nonzero(np.array(lab) != -100) for _, lab in va)
    again = _segments(split_fraction(data, 0.2, seed=7, max_seq_len=64)[1])
    assert again == va  # same seed, same split
    other = _segments(split_fraction(data, 0.2, seed=8, max_seq_len=64)[1])
    assert sorted(other) != sorted(va)  # the seed chooses the examples
    with pytest.raises(ValidationError, match="leaves none to train on"):
        split_fraction(packed_toy_dataset(1, 2), 0.9, seed=0, max_seq_len=64)


# --------------------------------------------------------------------------------------------
# the loss


def test_eval_loss_is_the_mean_over_supervised_tokens_of_the_validation_set(tmp_path):
    """eval_loss at the last step equals a float64 reference: every held-out example through the saved adapter,
    token NLL summed, / supervised tokens. The validation rows come in batches of different token counts, so the
    mean of the per-batch means (what HF's own evaluation loop reports) is measurably different."""
    from peft import PeftModel

    from qtulu.train.validation import split_fraction

    data = packed_toy_dataset(24, 2, seed=2)
    recipe = _recipe({"max_steps": 4, "micro_batch_size": 1, "eval_steps": 2}, validation=0.25,
                     data={"max_seq_len": 48})
    res = _train(recipe, tmp_path / "run", data)
    evals = [r for r in _lines(tmp_path / "run" / "steps.jsonl") if "eval_loss" in r]
    assert [e["step"] for e in evals] == [2, 4]
    assert res.evals == evals and res.eval_loss == evals[-1]["eval_loss"]

    _, val_rows, _ = split_fraction(data, 0.25, recipe.data.seed, 48)
    assert len(val_rows) > 1
    fresh = build_tiny_llama(0)
    fresh.set_attn_implementation("sdpa")
    model = PeftModel.from_pretrained(fresh, str(res.adapter_dir)).double().eval()
    total, count, row_means = 0.0, 0, []
    with torch.no_grad():
        for row in val_rows:
            row_sum, row_n = 0.0, 0
            for ids, labels in _segments([row]):
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
                target = torch.tensor(labels[1:])
                keep = target != -100
                nll = -torch.log_softmax(logits, -1)[keep, target[keep]]
                row_sum += float(nll.sum())
                row_n += int(keep.sum())
            total, count = total + row_sum, count + row_n
            row_means.append(row_sum / row_n)
    reference = total / count
    assert evals[-1]["eval_tokens"] == count
    assert evals[-1]["eval_loss"] == pytest.approx(reference, rel=1e-5)
    mean_of_means = sum(row_means) / len(row_means)
    assert abs(mean_of_means - reference) / reference > 1e-4  # the test tells the two apart

    meta = json.loads((res.adapter_dir / "qtulu.json").read_text())
    v = meta["data_manifest"]["validation"]
    assert v["source"] == "fraction" and v["fraction"] == 0.25 and v["seed"] == recipe.data.seed
    assert v["validation"]["supervised_tokens"] == count
    assert meta["extra"]["train"]["final_eval_loss"] == evals[-1]["eval_loss"]


def test_keep_best_checkpoint_saves_the_lowest_validation_loss(tmp_path):
    from safetensors.torch import load_file

    data = packed_toy_dataset(16, 3, seed=1)
    recipe = _recipe({"max_steps": 4, "eval_steps": 2, "save_steps": 2, "save_total_limit": 1,
                      "keep_best_checkpoint": True, "learning_rate": 0.3})
    out = tmp_path / "run"
    res = _train(recipe, out, data)
    evals = res.evals
    best = min(evals, key=lambda e: e["eval_loss"])
    assert best["step"] != res.global_step, "precondition: this lr makes the last evaluation worse than an earlier one"
    assert res.best_eval == {"step": best["step"], "eval_loss": best["eval_loss"]} and res.adapter_step == best["step"]
    # the best checkpoint outlived save_total_limit=1 next to the newest one
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"checkpoint-{best['step']}",
                                                                       f"checkpoint-{res.global_step}"]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    in_best = load_file(str(out / "checkpoints" / f"checkpoint-{best['step']}" / "adapter_model.safetensors"))
    assert saved.keys() == in_best.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], in_best[k], rtol=0, atol=0)
    meta = json.loads((out / "adapter" / "qtulu.json").read_text())["extra"]["train"]
    assert meta["adapter_step"] == best["step"] and meta["global_step"] == res.global_step
    assert f"best {best['eval_loss']:.4f} at step {best['step']}, kept" in res.summary()
    state = json.loads((out / "checkpoints" / f"checkpoint-{res.global_step}" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(out / "checkpoints" / f"checkpoint-{best['step']}")


def test_validation_settings_are_checked_with_the_recipe():
    from qtulu.recipes import RecipeError

    with pytest.raises(RecipeError, match=r"data\.validation: a fraction .* \(0, 1\)"):
        _recipe(validation=1.5)
    with pytest.raises(RecipeError, match=r"train\.eval_steps: needs held-out data"):
        _recipe({"eval_steps": 2}, validation=None)
    with pytest.raises(RecipeError, match=r"train\.eval_steps: must be >= 0"):
        _recipe({"eval_steps": -1})
    with pytest.raises(RecipeError, match=r"train\.keep_best_checkpoint: needs a checkpoint at every evaluation"):
        _recipe({"eval_steps": 3, "save_steps": 2, "keep_best_checkpoint": True})
    with pytest.raises(RecipeError, match=r"data\.validation_format: unknown format"):
        _recipe(validation="v.jsonl", data={"validation_format": "nope"})
    with pytest.raises(RecipeError, match=r"train\.report_to: unknown logger 'tensorbord'"):
        _recipe({"report_to": "tensorbord"})


def test_cli_validation_file_and_a_bad_validation_path(tmp_path, capsys, monkeypatch):
    """`qtulu train` with data.validation a jsonl file: eval lines, the summary, the manifest; a missing file is a
    one-line error naming data.validation, before the model loads."""
    from qtulu.cli import main
    from qtulu.demo.synthetic import make_examples, write_jsonl

    base_dir = tmp_path / "base"
    build_tiny_llama(0).save_pretrained(base_dir, safe_serialization=True)
    build_char_tokenizer().save_pretrained(base_dir)
    write_jsonl(make_examples("upper", 24, split="train", seed=0), tmp_path / "upper.jsonl")
    write_jsonl(make_examples("upper", 6, split="test", seed=1), tmp_path / "held.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: cli-val\n"
        "sources:\n  - {name: upper, format: messages, path: upper.jsonl}\n"
        "data: {max_seq_len: 128, validation: held.jsonl}\n"
        f"model: {{base: {base_dir}, compute_dtype: float32, quantize: null}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        "train: {max_steps: 2, micro_batch_size: 1, gradient_accumulation_steps: 1, save_steps: 0, logging_steps: 1,\n"
        "        eval_steps: 1, optimizer: adamw_torch}\n"
    )
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    lines = _lines(tmp_path / "out" / "steps.jsonl")
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in lines] == [1, 1, 2, 2] and [e["step"] for e in evals] == [1, 2]
    assert f"validation loss {evals[-1]['eval_loss']:.4f}" in printed
    v = json.loads((tmp_path / "out" / "adapter" / "qtulu.json").read_text())["data_manifest"]["validation"]
    assert v["source"] == "file" and v["path"] == str(tmp_path / "held.jsonl") and v["validation"]["examples"] == 6

    import qtulu.train.run as run_mod

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before data.validation was checked")

    monkeypatch.setattr(run_mod, "load_for_recipe", no_model)
    rc = main(["train", str(recipe), "--set", "data.validation=missing.jsonl", "--output-dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "data.validation: no such file" in err and "missing.jsonl" in err


# --------------------------------------------------------------------------------------------
# live steps.jsonl, resume, loggers


class ReadStepsFile(TrainerCallback):
    """At the start of each step, what another reader sees in steps.jsonl."""

    def __init__(self, path):
        self.path, self.seen = path, {}

    def on_step_begin(self, args, state, control, **kw):
        self.seen[state.global_step] = [r["step"] for r in _lines(self.path)] if self.path.exists() else None


class StopBefore(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == self.step:
            raise KeyboardInterrupt


def test_steps_jsonl_is_written_as_the_run_goes(tmp_path):
    out = tmp_path / "run"
    reader = ReadStepsFile(out / "steps.jsonl")
    _train(toy_recipe(train={"max_steps": 4, "logging_steps": 1}), out, packed_toy_dataset(8, 2), callbacks=[reader])
    assert reader.seen == {0: [], 1: [1], 2: [1, 2], 3: [1, 2, 3]}
    reader = ReadStepsFile(out / "steps.jsonl")  # logging every 2 steps: appended at steps 2 and 4
    _train(toy_recipe(train={"max_steps": 4, "logging_steps": 2}), out, packed_toy_dataset(8, 2), callbacks=[reader])
    assert reader.seen == {0: [], 1: [], 2: [1, 2], 3: [1, 2]}
    assert [r["step"] for r in _lines(out / "steps.jsonl")] == [1, 2, 3, 4]


def test_resumed_run_neither_duplicates_nor_loses_lines(tmp_path):
    """Ctrl-C before step 4 leaves lines for steps 1-3 (with the evaluation at 2); the resume restarts from
    checkpoint-2, drops the line of step 3 (trained again) and ends with each record once, as an uninterrupted run."""
    data = packed_toy_dataset(16, 2, seed=4)
    recipe = _recipe({"max_steps": 4, "eval_steps": 2, "save_steps": 2, "save_total_limit": 5},
                     data={"max_seq_len": 48})
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="checkpoint-2"):
        _train(recipe, out, data, callbacks=[StopBefore(4)])
    cut = _lines(out / "steps.jsonl")
    assert [(r["step"], "eval_loss" in r) for r in cut] == [(1, False), (2, False), (2, True), (3, False)]
    _train(recipe, out, data, resume="auto")
    resumed = _lines(out / "steps.jsonl")
    _train(recipe, tmp_path / "whole", data)
    whole = _lines(tmp_path / "whole" / "steps.jsonl")
    keys = [(r["step"], "eval_loss" in r) for r in resumed]
    assert keys == [(r["step"], "eval_loss" in r) for r in whole] == [(1, False), (2, False), (2, True), (3, False),
                                                                      (4, False), (4, True)]
    for a, b in zip(resumed, whole):
        for k in ("loss", "eval_loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5), (a, b)


@pytest.mark.parametrize("eval_steps,evaluated", [(2, [2, 3]), (0, [3])])
def test_tensorboard_event_file_holds_the_losses(tmp_path, eval_steps, evaluated):
    pytest.importorskip("tensorboard", reason="the `tensorboard` package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    recipe = _recipe({"max_steps": 3, "eval_steps": eval_steps, "report_to": "tensorboard"}, data={"max_seq_len": 48})
    _train(recipe, out, packed_toy_dataset(12, 2, seed=3))
    lines = _lines(out / "steps.jsonl")
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    train_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    eval_loss = {e.step: e.value for e in acc.Scalars("eval/loss")}
    assert train_loss == pytest.approx({r["step"]: r["loss"] for r in lines if "loss" in r}, rel=1e-6)
    assert eval_loss == pytest.approx({r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}, rel=1e-6)
    assert sorted(eval_loss) == evaluated


def test_a_requested_logger_that_is_not_installed_fails_before_the_model_loads(tmp_path, monkeypatch):
    import qtulu.train.run as run_mod
    from qtulu.train.run import TrainError

    monkeypatch.setitem(run_mod._LOGGER_PACKAGES, "wandb", ("qtulu_test_absent_logger",))

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before train.report_to was checked")

    monkeypatch.setattr(run_mod, "load_for_recipe", no_model)
    with pytest.raises(TrainError, match=r"train\.report_to=wandb: the package 'qtulu_test_absent_logger' is not "
                                         r"installed \(pip install qtulu_test_absent_logger"):
        _train(toy_recipe(train={"report_to": "wandb"}), tmp_path / "run", packed_toy_dataset(4, 2))
    assert not (tmp_path / "run" / "steps.jsonl").exists()
