"""Feeding each task the gold answers scores 100% (through its own prompt building, predict and score)."""

from __future__ import annotations

import json

import pytest

from qtulu.evals.lm import LM
from qtulu.evals.tasks import get_task


class OracleLM(LM):
    """An LM that answers from a table keyed by the exact prompt the task built (unknown prompt: KeyError)."""

    def __init__(self, tokenizer, chat_format="tulu", gen=None, choice=None, ll=None):
        super().__init__(model=None, tokenizer=tokenizer, batch_size=8, chat_format=chat_format)
        self.gen, self.choice, self.ll = gen or {}, choice or {}, ll or {}

    def generate(self, prompts, **kwargs):
        if isinstance(self.gen, list):  # ordered (prompt, answer): inputs may repeat with other golds
            assert list(prompts) == [p for p, _ in self.gen]
            return [[a] for _, a in self.gen]
        return [[self.gen[p]] for p in prompts]

    def next_token_logprobs(self, prompts, candidate_ids):
        return [[0.0 if j == self.choice[p] else -10.0 for j in range(len(candidate_ids))] for p in prompts]

    def loglikelihood(self, requests):
        return [(self.ll[r], True) for r in requests]


@pytest.mark.parametrize("chat_format", ["tulu", None])
def test_mmlu_oracle_scores_100(eval_data, char_tokenizer, chat_format):
    task = get_task("mmlu_5shot")
    examples = task.module.load(eval_data, **task.opts)
    assert len(examples) == 14042 and len({e["subject"] for e in examples}) == 57
    lm = OracleLM(char_tokenizer, chat_format)
    lm.choice = {task.module.build_prompt(lm, ex): "ABCD".index(ex["gold"]) for ex in examples}
    metrics = task.module.score(task.module.predict(lm, examples))
    assert metrics["acc"] == 1.0 and metrics["n"] == 14042 and len(metrics["per_subject"]) == 57
    # and an oracle that is wrong on every question scores 0
    lm.choice = {p: (c + 1) % 4 for p, c in lm.choice.items()}
    assert task.module.score(task.module.predict(lm, examples))["acc"] == 0.0


@pytest.mark.parametrize("name", ["gsm8k", "gsm8k_direct"])
def test_gsm8k_gold_rationales_score_100(eval_data, char_tokenizer, name):
    task = get_task(name)
    examples = task.module.load(eval_data, **task.opts)
    assert len(examples) == 1319
    with open(eval_data / "gsm" / "test.jsonl", encoding="utf-8") as f:
        rationales = [json.loads(line)["answer"] for line in f if line.strip()]
    lm = OracleLM(char_tokenizer)
    # the reference solution, its "#### N" rewritten the way the exemplars end
    lm.gen = {task.module.build_prompt(lm, ex["question"], task.opts["cot"]): r.replace("####", "So the answer is") + "."
              for ex, r in zip(examples, rationales)}
    metrics = task.module.score(task.module.predict(lm, examples, **task.opts))
    assert metrics["exact_match"] == 1.0 and metrics["n"] == 1319


@pytest.mark.parametrize("name", ["bbh", "bbh_direct"])
def test_bbh_gold_scores_100_on_every_task(eval_data, char_tokenizer, name):
    task = get_task(name)
    examples = task.module.load(eval_data, **task.opts)
    assert len(examples) == 6511
    lm = OracleLM(char_tokenizer, chat_format=None)
    # ordered, not a dict: causal_judgement repeats an input with both golds
    lm.gen = [(task.module.build_prompt(lm, ex), f"Let's think step by step. So the answer is {ex['gold']}.")
              for ex in examples]
    metrics = task.module.score(task.module.predict(lm, examples))
    assert metrics["exact_match"] == 1.0 and len(metrics["per_task"]) == 27
    assert all(v == 1.0 for v in metrics["per_task"].values())


def test_bbh_direct_prompts_drop_the_reasoning(eval_data):
    from qtulu.evals.tasks.bbh import read_prompt

    for path in sorted((eval_data / "bbh" / "cot-prompts").glob("*.txt")):
        cot, direct = read_prompt(path, cot=True), read_prompt(path, cot=False)
        assert cot.count("Let's think step by step") == 3, path.name
        assert "Let's think step by step" not in direct and direct.count("\nA: ") == 3, path.name


@pytest.mark.parametrize("name", ["tydiqa", "tydiqa_nocontext"])
def test_tydiqa_fixture_gold_scores_100(tydiqa_dir, char_tokenizer, name):
    task = get_task(name)
    examples = task.module.load(tydiqa_dir, **task.opts)
    assert [e["lang"] for e in examples] == ["english", "english", "finnish"]
    assert all(len(e["shots"]) == 1 and e["shots"][0]["lang"] == e["lang"] for e in examples)
    lm = OracleLM(char_tokenizer)
    lm.gen = {task.module.build_prompt(lm, ex, no_context=task.opts["no_context"]): " " + ex["answers"][-1]
              for ex in examples}
    prompt = next(iter(lm.gen))
    assert ("Passage:" in prompt) != task.opts["no_context"] and prompt.endswith("Answer:")
    metrics = task.module.score(task.module.predict(lm, examples, **task.opts))
    assert metrics["f1"] == 1.0 and metrics["exact_match"] == 1.0
    assert set(metrics["per_language"]) == {"english", "finnish"}


def test_tydiqa_loader_names_bad_file(tmp_path):
    from qtulu.evals.tasks._common import TaskDataError

    (tmp_path / "tydiqa").mkdir()
    (tmp_path / "tydiqa" / "tydiqa-goldp-v1.1-dev.json").write_text(json.dumps(
        {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "klingon-1", "question": "q", "answers": [{"text": "a"}]}]}]}]}))
    with pytest.raises(TaskDataError, match="tydiqa-goldp-v1.1-dev.json.*klingon"):
        get_task("tydiqa").module.load(tmp_path, n_shot=0)


def test_truthfulqa_mc_oracle_scores_100(eval_data, char_tokenizer):
    task = get_task("truthfulqa_mc")
    examples = task.module.load(eval_data)
    assert len(examples) == 817
    lm = OracleLM(char_tokenizer)
    for ex in examples:
        prompt = task.module.build_prompt(lm, ex["question"])
        for a in ex["true"]:
            lm.ll[(prompt, " " + a)] = 0.0 if a == ex["best"] else -1.0
        for a in ex["false"]:
            lm.ll[(prompt, " " + a)] = -1e4
    metrics = task.module.score(task.module.predict(lm, examples, mode="mc"))
    assert metrics["mc1"] == 1.0 and metrics["mc2"] == 1.0 and metrics["n"] == 817
