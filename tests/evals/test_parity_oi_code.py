"""TyDi QA GoldP and TruthfulQA MC1/MC2 against open-instruct's OWN eval code (not a re-implementation):
eval/tydiqa/run_eval.py ``main`` and eval/truthfulqa/run_eval.py ``run_probs`` at 171c3f163, imported
from a checkout, run with the model stubbed; qtulu's tasks run through qtulu's real `LM` on the same
stub, with the tokenizer qtulu's `load_tokenizer` gives for LLaMA's tokenizer.model.

open-instruct is not on PyPI and tests have no network, so the checkout comes from the environment:

    git -C open-instruct archive 171c3f163 | tar -x -C /tmp/oi-171c3f163
    git -C evaluate archive HEAD metrics | tar -x -C /tmp/hf-evaluate     # SQuAD metric script
    QTULU_OPEN_INSTRUCT=/tmp/oi-171c3f163 QTULU_HF_EVALUATE=/tmp/hf-evaluate pytest tests/evals/test_parity_oi_code.py

Without them the tests skip, naming the variable. The stub model is a fixed random bigram model for
scoring and, for generation, emits a per-question reply token by token (checking the caller's
stopping criteria after each token, as transformers' ``generate`` does), so open-instruct's own
stop handling and qtulu's are both exercised. Modules open-instruct imports that play no part here
(vllm, openai, its training script) are replaced by empty modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
from argparse import Namespace
from pathlib import Path

import pytest

from qtulu.evals.tasks import get_task

OI_ENV, EVALUATE_ENV = "QTULU_OPEN_INSTRUCT", "QTULU_HF_EVALUATE"


def _env_dir(var: str, probe: str, what: str) -> Path:
    root = os.environ.get(var)
    if not root:
        pytest.skip(f"{var} is not set: point it at {what} to run this parity test")
    if not (Path(root) / probe).is_file():
        pytest.fail(f"{var}={root}: no {probe} there ({what})")
    return Path(root)


@pytest.fixture
def open_instruct(monkeypatch):
    """open-instruct's ``eval`` package from ``$QTULU_OPEN_INSTRUCT`` (a tree at 171c3f163), importable."""
    root = _env_dir(OI_ENV, "eval/tydiqa/run_eval.py", "an open-instruct tree at 171c3f163 (git archive 171c3f163)")
    for name in ("vllm", "openai"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    pkg, finetune = types.ModuleType("open_instruct"), types.ModuleType("open_instruct.finetune")
    finetune.encode_with_prompt_completion_format = None  # imported by eval/utils.py, used only for training
    pkg.finetune = finetune
    monkeypatch.setitem(sys.modules, "open_instruct", pkg)
    monkeypatch.setitem(sys.modules, "open_instruct.finetune", finetune)
    monkeypatch.syspath_prepend(str(root))
    for k in [k for k in sys.modules if k == "eval" or k.startswith("eval.")]:
        monkeypatch.delitem(sys.modules, k)
    yield root
    for k in [k for k in sys.modules if k == "eval" or k.startswith("eval.")]:
        del sys.modules[k]


@pytest.fixture
def tokenizer(llama_tokenizer_path):
    """qtulu's tokenizer for LLaMA's tokenizer.model: it must add the BOS as 2023's did."""
    from qtulu.data.tokenizer import load_tokenizer

    tok = load_tokenizer(llama_tokenizer_path)
    assert tok("Hello world")["input_ids"] == [1, 15043, 3186]
    return tok


class _Out(tuple):
    @property
    def logits(self):
        return self[0]


class StubModel:
    """A causal LM without weights: bigram logits ``W[id % K]`` for scoring; for generation, each
    prompt's reply (``reply(prompt_text)``) fed token by token, then EOS."""

    def __init__(self, tokenizer, reply=None, K=97, seed=0):
        import torch

        self.tok, self.reply, self.K = tokenizer, reply, K
        self.W = torch.randn(K, len(tokenizer), generator=torch.Generator().manual_seed(seed)) * 3  # (K, V)
        self.device = torch.device("cpu")
        self.prompt_ids: list[list[int]] = []

    def parameters(self):
        return iter(())

    def __call__(self, input_ids=None, **_):
        return _Out((self.W[input_ids % self.K],))  # (B, T, V)

    def generate(self, input_ids, attention_mask=None, stopping_criteria=None, max_new_tokens=50, **_):
        import torch

        eos, pad = 2, self.tok.pad_token_id
        rows = []
        for i in range(input_ids.shape[0]):
            ids = input_ids[i][attention_mask[i].bool()].tolist() if attention_mask is not None else input_ids[i].tolist()
            self.prompt_ids.append(ids)
            text = self.tok.decode(ids, skip_special_tokens=True)
            rows.append(self.tok.encode(self.reply(text), add_special_tokens=False) + [eos])
        out, done = input_ids, torch.zeros(len(rows), dtype=torch.bool)
        for step in range(max_new_tokens):
            nxt = torch.tensor([pad if done[i] or step >= len(r) else r[step] for i, r in enumerate(rows)])
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= torch.tensor([step + 1 >= len(r) for r in rows])  # EOS emitted
            for crit in stopping_criteria or []:
                hit = crit(out, None)
                done |= hit if isinstance(hit, torch.Tensor) else torch.full_like(done, bool(hit))
            if done.all():
                break
        return out


# --- TyDi QA ------------------------------------------------------------------------------------


def _write_goldp(root):
    """The TyDi QA GoldP fixture of test_parity_bbh_tydiqa.py (4 languages, passages to > 512 tokens)."""
    spec = importlib.util.spec_from_file_location("_tydi_fixture", Path(__file__).with_name("test_parity_bbh_tydiqa.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_goldp(root)


def _last_question(text: str, q_templates) -> str:
    for line in reversed(text.split("\n")):
        for q in q_templates:
            if line.startswith(q + " "):
                return " ".join(line[len(q) + 1:].split())
    raise AssertionError(f"no question in {text[-200:]!r}")


class _Datasets2Inputs:
    """evaluate's SQuAD metric (metrics/squad, unchanged since 2022-09) as open-instruct called it in
    2023: its ``Sequence({"text", "answer_start"})`` feature took TyDi QA's list of answer dicts, which
    datasets 2.x turned into a dict of lists; datasets 5.x refuses the list, so that one conversion
    is done here, exactly as datasets did it, and the metric's own code computes the scores."""

    def __init__(self, metric):
        self.metric = metric

    def compute(self, predictions, references):
        refs = [{"id": r["id"], "answers": {k: [a[k] for a in r["answers"]] for k in ("text", "answer_start")}}
                for r in references]
        return self.metric.compute(predictions=predictions, references=refs)


class _SortedSet(set):
    """``set`` iterating in sorted order: open-instruct iterates TyDi QA's languages in ``set`` order,
    which changes with PYTHONHASHSEED; qtulu takes them sorted (results.md's subset order rule)."""

    def __iter__(self):
        return iter(sorted(super().__iter__()))


@pytest.mark.parametrize("chat", [False, True])
def test_tydiqa_goldp_equals_open_instruct_code(open_instruct, tokenizer, tmp_path, monkeypatch, chat):
    import evaluate

    from qtulu.evals.lm import LM
    from qtulu.evals.tasks.tydiqa import WITH_CONTEXT

    metrics_dir = _env_dir(EVALUATE_ENV, "metrics/squad/squad.py", "a huggingface/evaluate tree (its metrics/ folder)")
    real_load = evaluate.load
    monkeypatch.setattr(evaluate, "load", lambda name, **kw: _Datasets2Inputs(real_load(str(metrics_dir / "metrics" / name), **kw)))
    data = _write_goldp(tmp_path)
    dev = json.loads((data / "tydiqa" / "tydiqa-goldp-v1.1-dev.json").read_text(encoding="utf-8"))
    golds = {" ".join(qa["question"].split()): qa["answers"][0]["text"]
             for art in dev["data"] for para in art["paragraphs"] for qa in para["qas"]}
    kinds = [lambda g: g + "\nQuestion: and then?", lambda g: "The " + g + "!", lambda g: "Lyon", lambda g: g.upper(),
             lambda g: ""]
    replies = {q: kinds[i % len(kinds)](g) for i, (q, g) in enumerate(sorted(golds.items()))}
    q_templates = [t[2] for t in WITH_CONTEXT.values()]

    def reply(text):
        return replies[_last_question(text, q_templates)]

    # open-instruct's run_eval.main, its model and tokenizer loader stubbed
    run_eval = importlib.import_module("eval.tydiqa.run_eval")
    oi_model = StubModel(tokenizer, reply)
    monkeypatch.setattr(run_eval, "load_hf_lm_and_tokenizer", lambda **kw: (oi_model, tokenizer))
    monkeypatch.setattr(run_eval, "set", _SortedSet, raising=False)
    oi_prompts = []
    real_generate = run_eval.generate_completions
    monkeypatch.setattr(run_eval, "generate_completions", lambda **kw: (oi_prompts.extend(kw["prompts"]), real_generate(**kw))[1])
    save = tmp_path / "oi"
    run_eval.main(Namespace(
        data_dir=str(data / "tydiqa"), max_num_examples_per_lang=100, n_shot=1, no_context=False, max_context_length=512,
        save_dir=str(save), model_name_or_path="stub", tokenizer_name_or_path=None, use_slow_tokenizer=False,
        openai_engine=None, eval_batch_size=1, load_in_8bit=False, gptq=False, use_vllm=False, use_chat_format=chat,
        chat_formatting_function="eval.templates.create_prompt_with_tulu_chat_format"))
    oi_scores = json.loads((save / "metrics.json").read_text())
    oi_preds = [json.loads(line) for line in (save / "tydiaqa_predictions.jsonl").read_text().splitlines()]

    # qtulu: the task through its real LM on the same stub
    task = get_task("tydiqa")
    examples = task.module.load(data, **task.opts)
    q_model = StubModel(tokenizer, reply)
    lm = LM(q_model, tokenizer, batch_size=8, chat_format="tulu" if chat else None)
    prompts = [task.module.build_prompt(lm, ex) for ex in examples]
    preds = task.module.predict(lm, examples, **task.opts)
    got = task.module.score(preds)

    assert len(prompts) == len(oi_prompts) == 330 and prompts == oi_prompts
    assert any("Passage: <s> " in p for p in prompts)  # a clipped passage keeps the BOS's text, as there
    assert [ex["id"] for ex in examples] == [p["id"] for p in oi_preds]
    assert sorted(q_model.prompt_ids) == sorted(oi_model.prompt_ids)  # token ids fed to the model
    assert all(ids[0] == 1 for ids in q_model.prompt_ids)
    assert [p["prediction"] for p in preds] == [p["prediction_text"] for p in oi_preds]
    for lang, v in got["per_language"].items():
        assert 100 * v["f1"] == pytest.approx(oi_scores[lang]["f1"], abs=1e-9), lang
        assert 100 * v["exact_match"] == pytest.approx(oi_scores[lang]["exact_match"], abs=1e-9), lang
    assert 100 * got["f1"] == pytest.approx(oi_scores["average"]["f1"], abs=1e-9)
    assert 100 * got["exact_match"] == pytest.approx(oi_scores["average"]["exact_match"], abs=1e-9)
    assert 0 < got["exact_match"] < 1 and 0 < got["f1"] < 1  # right, wrong and partly right replies all counted


# --- TruthfulQA MC ------------------------------------------------------------------------------


def test_truthfulqa_mc1_mc2_equal_open_instruct_code(open_instruct, tokenizer, shared_data):
    import math

    import pandas as pd

    from qtulu.evals.lm import LM

    csv_path = shared_data("eval", "truthfulqa", "TruthfulQA.csv")
    run_eval = importlib.import_module("eval.truthfulqa.run_eval")
    oi_model = StubModel(tokenizer)
    questions = run_eval.run_probs(pd.read_csv(csv_path), oi_model, tokenizer, tag="stub", preset="qa")
    # main() then averages every numeric column (format_frame keeps the non-object ones; under pandas
    # 3 text columns are no longer object, so the two numeric columns are averaged directly, as there)
    means = {("stub", k): questions[f"stub {k}"].astype(float).mean() for k in ("MC1", "MC2")}

    task = get_task("truthfulqa_mc")
    examples = task.module.load(csv_path.parent.parent, **task.opts)
    lm = LM(StubModel(tokenizer), tokenizer, batch_size=16, chat_format=None)
    preds = task.module.predict(lm, examples, **task.opts)
    got = task.module.score(preds, **task.opts)

    assert len(examples) == len(questions) == 817
    scored = [p for p in preds if "scores_true" in p]
    assert got["n"] == len(scored) == int(questions["stub MC1"].notna().sum())
    for p, (_, row) in zip(preds, questions.iterrows()):
        if "scores_true" not in p:
            assert pd.isnull(row["stub MC1"])
            continue
        their_true = [float(x) for x in row["stub lprob scores-true"].split(",")]
        their_false = [float(x) for x in row["stub lprob scores-false"].split(",")]
        assert p["scores_true"] == pytest.approx(their_true, rel=1e-6, abs=1e-4)
        assert p["scores_false"] == pytest.approx(their_false, rel=1e-6, abs=1e-4)
    assert got["mc1"] == pytest.approx(means[("stub", "MC1")], abs=1e-9)
    assert got["mc2"] == pytest.approx(means[("stub", "MC2")], abs=1e-9) and not math.isnan(got["mc2"])
