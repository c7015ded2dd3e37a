"""MMLU and GSM8K, open_instruct profile, against an independent oracle: open-instruct's own logic
re-implemented here from eval/mmlu/run_eval.py and eval/gsm/run_eval.py at 171c3f163 (plus
eval/templates.py and evaluate's exact_match), run on the real rows of ../shared/data/eval."""

from __future__ import annotations

import hashlib
import json
import random
import re
import string

import numpy as np
import pytest

from qtulu.evals.tasks import get_task

CHOICES = ["A", "B", "C", "D"]


def oi_tulu_chat(user: str) -> str:
    """eval/templates.py create_prompt_with_tulu_chat_format([user message], add_bos=False)."""
    return "<|user|>\n" + user + "\n" + "<|assistant|>\n"


def oi_exact_match(predictions, references):
    """evaluate's metrics/exact_match/exact_match.py `_compute(..., ignore_case=True, ignore_punctuation=True)`."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    predictions, references = np.char.lower(predictions), np.char.lower(references)
    repl_table = string.punctuation.maketrans("", "", string.punctuation)
    predictions = np.char.translate(predictions, table=repl_table)
    references = np.char.translate(references, table=repl_table)
    return np.mean(predictions == references)


# --- MMLU: eval/mmlu/run_eval.py -------------------------------------------------------------------


def oi_format_subject(subject):
    s = ""
    for entry in subject.split("_"):
        s += " " + entry
    return s


def oi_format_example(df, idx, include_answer=True):
    prompt = df.iloc[idx, 0]
    k = df.shape[1] - 2
    for j in range(k):
        prompt += "\n{}. {}".format(CHOICES[j], df.iloc[idx, j + 1])
    prompt += "\nAnswer:"
    if include_answer:
        prompt += " {}\n\n".format(df.iloc[idx, k + 1])
    return prompt


def oi_gen_prompt(train_df, subject, k=-1):
    prompt = "The following are multiple choice questions (with answers) about {}.\n\n".format(oi_format_subject(subject))
    if k == -1:
        k = train_df.shape[0]
    for i in range(k):
        prompt += oi_format_example(train_df, i)
    return prompt


def oi_mmlu_prompts(data_dir, subject, ntrain, tokenizer, use_chat_format, n_rows):
    """eval_hf_model's prompt loop (the first ``n_rows`` test rows) and the gold column."""
    import pandas as pd

    dev_df = pd.read_csv(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv", header=None)[:ntrain]
    test_df = pd.read_csv(data_dir / "mmlu" / "test" / f"{subject}_test.csv", header=None)
    prompts, shots = [], []
    for i in range(n_rows):
        k = ntrain
        prompt_end = oi_format_example(test_df, i, include_answer=False)

        def make(k):
            prompt = oi_gen_prompt(dev_df, subject, k) + prompt_end
            if use_chat_format:
                prompt = oi_tulu_chat(prompt)
                prompt += "The answer is:" if prompt[-1] in ["\n", " "] else " The answer is:"
            return prompt

        prompt = make(k)
        while len(tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids) > 2048:
            k -= 1
            prompt = make(k)
        prompts.append(prompt)
        shots.append(k)
    return prompts, shots, list(test_df.iloc[:n_rows, -1].values)


MMLU_SUBJECTS = ["college_mathematics", "electrical_engineering", "high_school_european_history"]  # sorted


@pytest.mark.parametrize("k_shot,chat", [(0, False), (0, True), (5, False), (5, True)])
def test_mmlu_prompts_and_scores_equal_open_instruct(eval_data, llama_tok, stub_lm, k_shot, chat):
    n_rows = 18  # per subject: 54 prompts, among them "nan" cells and 5-shot prompts that must drop shots
    task = get_task("mmlu_5shot" if k_shot else "mmlu", subjects=MMLU_SUBJECTS)
    examples = task.module.load(eval_data, limit=n_rows, **task.opts)
    lm = stub_lm(llama_tok, chat_format="tulu" if chat else None)
    got = [task.module.build_prompt(lm, ex) for ex in examples]
    want, shots, golds = [], [], []
    for subject in MMLU_SUBJECTS:
        p, s, g = oi_mmlu_prompts(eval_data, subject, k_shot, llama_tok, chat, n_rows)
        want, shots, golds = want + p, shots + s, golds + g
    assert len(got) == len(want) == 54
    assert got == want
    assert [ex["id"] for ex in examples[:2]] == ["college_mathematics/0", "college_mathematics/1"]
    assert any("\nA. nan\n" in p for p in got)  # pandas reads "None" as NaN: the paper's models saw "nan"
    assert all("about  " in p for p in got)  # format_subject's double space
    if k_shot:
        assert 0 < min(shots) < 5  # some prompts had to drop shots; none is over 2048 tokens without BOS
        assert all(len(llama_tok(p, add_special_tokens=False)["input_ids"]) <= 2048 for p in got)
    # candidates: the last token of " A" .. " D", as open-instruct
    cand = [llama_tok.encode(" " + c, add_special_tokens=False)[-1] for c in CHOICES]
    # scorer: gold, wrong, ties (argmax takes the first), random log-probabilities
    rng = np.random.default_rng(0)
    index = {p: i for i, p in enumerate(got)}
    cases = {
        "gold": lambda i: [0.0 if c == golds[i] else -5.0 for c in CHOICES],
        "wrong": lambda i: [-5.0 if c == golds[i] else 0.0 for c in CHOICES],
        "ties": lambda i: [-1.0] * 4,
        "random": lambda i, r=rng.normal(size=(len(got), 4)): list(r[i]),
    }
    for name, logp in cases.items():
        lm.choice = lambda p, f=logp: f(index[p])
        preds = task.module.predict(lm, examples, **task.opts)
        assert lm.calls[-1][2] == cand
        oi_pred = [CHOICES[int(np.argmax(np.exp(logp(i))))] for i in range(len(got))]
        oi_acc = np.mean([p == g for p, g in zip(oi_pred, golds)])
        assert task.module.score(preds)["acc"] == pytest.approx(oi_acc), name


def test_mmlu_corrected_profile(eval_data, llama_tok, stub_lm):
    task = get_task("mmlu_5shot", subjects=["college_mathematics"], profile="corrected")
    ex = task.module.load(eval_data, limit=9, **task.opts)[8]
    prompt = task.module.build_prompt(stub_lm(llama_tok, chat_format=None), ex, profile="corrected")
    assert "about college mathematics." in prompt and "\nA. None\n" in prompt


# --- GSM8K: eval/gsm/run_eval.py --------------------------------------------------------------------

OI_EXAMPLARS_SHA256 = "4ad5cd673fff1d65d1b2b174a6c65e1f3d92bdfb73a7e27640545f3a2fad426c"  # eval/gsm/examplars.py


def oi_examplars():
    from qtulu.evals.tasks.gsm8k import EXEMPLARS

    ex = [{"question": q, "cot_answer": c, "short_answer": s} for q, c, s in EXEMPLARS]
    # the exemplars are data, not logic: checked against open-instruct's file by hash (json.dumps of its list)
    assert hashlib.sha256(json.dumps(ex, ensure_ascii=False).encode()).hexdigest() == OI_EXAMPLARS_SHA256
    return ex


def oi_gsm(data_dir, *, n_shot=8, no_cot=False, use_chat_format=False, max_num_examples=200):
    state = random.getstate()
    try:
        random.seed(42)
        test_data = []
        with open(data_dir / "gsm" / "test.jsonl") as fin:
            for line in fin:
                example = json.loads(line)
                test_data.append({"question": example["question"], "answer": example["answer"].split("####")[1].strip()})
        for example in test_data:
            example["answer"] = re.sub(r"(\d),(\d)", r"\1\2", example["answer"])
        if max_num_examples and len(test_data) > max_num_examples:
            test_data = random.sample(test_data, max_num_examples)
        examplars = oi_examplars()
        if n_shot:
            if len(examplars) > n_shot:
                examplars = random.sample(examplars, n_shot)
            demonstrations = []
            for example in examplars:
                if no_cot:
                    demonstrations.append("Quesion: " + example["question"] + "\n" + "Answer: " + example["short_answer"])
                else:
                    demonstrations.append("Question: " + example["question"] + "\n" + "Answer: " + example["cot_answer"])
            prompt_prefix = "Answer the following questions.\n\n" + "\n\n".join(demonstrations) + "\n\n"
        else:
            prompt_prefix = "Answer the following question.\n\n"
    finally:
        random.setstate(state)
    prompts = []
    for example in test_data:
        prompt = prompt_prefix + "Question: " + example["question"].strip()
        if use_chat_format:
            prompt = oi_tulu_chat(prompt)
            prompt += "Answer:" if prompt[-1] in ["\n", " "] else " Answer:"
        else:
            prompt += "\nAnswer:"
        prompts.append(prompt)
    return test_data, prompts


def oi_gsm_score(outputs, targets):
    predictions = []
    for output in outputs:
        output = re.sub(r"(\d),(\d)", r"\1\2", output)
        numbers = re.findall(r"[-+]?\d*\.\d+|\d+", output)
        predictions.append(numbers[-1] if numbers else output)
    return oi_exact_match(predictions, targets)


@pytest.mark.parametrize("name,n_shot,chat", [("gsm8k", 8, False), ("gsm8k", 8, True), ("gsm8k_direct", 8, True),
                                              ("gsm8k_direct", 3, False)])
def test_gsm8k_subset_prompts_stops_and_scores_equal_open_instruct(eval_data, char_tokenizer, stub_lm, name, n_shot,
                                                                   chat):
    task = get_task(name, n_shot=n_shot)
    examples = task.module.load(eval_data, **task.opts)
    test_data, want = oi_gsm(eval_data, n_shot=n_shot, no_cot=not task.opts["cot"], use_chat_format=chat)
    lm = stub_lm(char_tokenizer, chat_format="tulu" if chat else None)
    got = [task.module.build_prompt(lm, ex) for ex in examples]
    assert len(got) == 200 and got == want  # the same 200 questions in the same order, byte-identical prompts
    assert [ex["gold"] for ex in examples] == [ex["answer"] for ex in test_data]
    if not task.opts["cot"]:
        assert "\nQuesion: " in got[0] or got[0].startswith("<|user|>\nAnswer the following questions.\n\nQuesion: ")
    lines = (eval_data / "gsm" / "test.jsonl").read_text().splitlines()
    assert all(json.loads(lines[int(ex["id"])])["question"] == ex["question"] for ex in examples)  # ids = file lines
    # generation settings: greedy, 512 new tokens, stop at the first newline (both formats)
    golds = [ex["gold"] for ex in examples]
    outputs = {
        "gold": [f"So the answer is {g}." for g in golds],
        "wrong": [f"So the answer is {int(float(g)) + 1}." for g in golds],
        "adversarial": [["$18.00", "18.0", "-" + g, "1,2," + g, f"{g}.0", "", "no idea", g + " apples"][i % 8]
                        for i, g in enumerate(golds)],
    }
    for kind, outs in outputs.items():
        reply = dict(zip(got, outs))
        lm.reply = lambda p, r=reply: r[p]
        preds = task.module.predict(lm, examples, **task.opts)
        _, _, kwargs = lm.calls[-1]
        assert kwargs["stop"] == ["\n"] and kwargs["max_new_tokens"] == 512 and kwargs.get("temperature", 0) == 0
        assert task.module.score(preds, **task.opts)["exact_match"] == pytest.approx(oi_gsm_score(outs, golds)), kind
    assert task.module.score([{"output": "-18", "gold": "18"}], **task.opts)["exact_match"] == 1.0  # open-instruct's


def test_gsm8k_corrected_profile(eval_data, char_tokenizer, stub_lm):
    task = get_task("gsm8k_direct", profile="corrected")
    examples = task.module.load(eval_data, **task.opts)
    assert "Quesion" not in examples[0]["prefix"] and examples[0]["prefix"].count("Question: ") == 8
    assert task.module.stops(stub_lm(char_tokenizer), "corrected") == []  # chat: the model's EOS ends it
    preds = [{"output": o, "gold": "18"} for o in ("$18.00", "18.0", "-18", "1,2,18")]
    assert task.module.score(preds, profile="corrected")["exact_match"] == 0.75
