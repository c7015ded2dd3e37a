"""BBH and TyDi QA, open_instruct profile, against an independent oracle: open-instruct's logic
re-implemented here from eval/bbh/run_eval.py and eval/tydiqa/run_eval.py at 171c3f163 (plus
evaluate's exact_match and squad metrics). BBH runs on the real rows of ../shared/data/eval; TyDi QA
is not there, so its rows are written by the test in TyDi QA GoldP's layout."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import string
from collections import Counter

import numpy as np
import pytest

from qtulu.evals.tasks import get_task


def oi_tulu_chat(user: str) -> str:
    """eval/templates.py create_prompt_with_tulu_chat_format([user message], add_bos=False)."""
    return "<|user|>\n" + user + "\n" + "<|assistant|>\n"


def oi_exact_match(predictions, references):
    """evaluate's exact_match `_compute(..., ignore_case=True, ignore_punctuation=True)`."""
    predictions, references = np.char.lower(np.asarray(predictions)), np.char.lower(np.asarray(references))
    table = string.punctuation.maketrans("", "", string.punctuation)
    return np.mean(np.char.translate(predictions, table=table) == np.char.translate(references, table=table))


# --- BBH: eval/bbh/run_eval.py ------------------------------------------------------------------


def oi_bbh(data_dir, *, no_cot=False, use_chat_format=False, max_num_examples_per_task=40):
    """(tasks {name: sampled examples}, prompts {name: [prompt]}). open-instruct globs the files in the
    file system's order; this oracle sorts them, the one deviation, which qtulu documents."""
    state = random.getstate()
    try:
        random.seed(42)
        all_tasks = {}
        for task_file in sorted(glob.glob(os.path.join(data_dir, "bbh", "bbh", "*.json"))):
            with open(task_file, "r") as f:
                task_name = os.path.basename(task_file).split(".")[0]
                all_tasks[task_name] = json.load(f)["examples"]
                if max_num_examples_per_task:
                    all_tasks[task_name] = random.sample(all_tasks[task_name], max_num_examples_per_task)
    finally:
        random.setstate(state)
    all_prompts = {}
    for cot_prompt_file in glob.glob(os.path.join(data_dir, "bbh", "cot-prompts", "*.txt")):
        with open(cot_prompt_file, "r") as f:
            task_name = os.path.basename(cot_prompt_file).split(".")[0]
            task_prompt = "".join(f.readlines()[2:])
            if no_cot:
                new_fields = []
                for field in task_prompt.split("\n\n"):
                    if field.startswith("Q:"):
                        answer = field.split("So the answer is")[-1].strip()
                        question = field.split("\nA:")[0].strip()
                        new_fields.append(question + "\nA: " + answer)
                    else:
                        new_fields.append(field)
                task_prompt = "\n\n".join(new_fields)
            all_prompts[task_name] = task_prompt
    prompts = {}
    for task_name, examples in all_tasks.items():
        prompts[task_name] = []
        for example in examples:
            prompt = all_prompts[task_name].strip() + "\n\nQ: " + example["input"]
            if use_chat_format:
                prompt = oi_tulu_chat(prompt)
                prompt += "A:" if prompt[-1] in ["\n", " "] else " A:"
            else:
                prompt += "\nA:"
            prompts[task_name].append(prompt)
    return all_tasks, prompts


def oi_bbh_score(all_tasks, outputs):
    performance = {}
    for task_name, examples in all_tasks.items():
        predictions = []
        for output in outputs[task_name]:
            extracted = re.search(r"So the answer is (.*?)\.", output)
            predictions.append(extracted.group(1).strip() if extracted else output.strip().split("\n\n")[0].strip())
        performance[task_name] = oi_exact_match(predictions, [ex["target"] for ex in examples])
    return sum(performance.values()) / len(performance)


@pytest.mark.parametrize("name,chat", [("bbh", False), ("bbh", True), ("bbh_direct", False)])
def test_bbh_subset_prompts_stops_and_scores_equal_open_instruct(eval_data, char_tokenizer, stub_lm, name, chat):
    task = get_task(name)
    examples = task.module.load(eval_data, **task.opts)
    all_tasks, prompts = oi_bbh(eval_data, no_cot=not task.opts["cot"], use_chat_format=chat)
    lm = stub_lm(char_tokenizer, chat_format="tulu" if chat else None)
    got = [task.module.build_prompt(lm, ex) for ex in examples]
    want = [p for t in all_tasks for p in prompts[t]]
    assert len(got) == 27 * 40 == len(want) and got == want
    assert [(ex["input"], ex["gold"]) for ex in examples] == [(e["input"], e["target"]) for t in all_tasks
                                                               for e in all_tasks[t]]
    rows = json.loads((eval_data / "bbh" / "bbh" / "date_understanding.json").read_text())["examples"]
    ex = next(e for e in examples if e["task"] == "date_understanding")
    assert rows[int(ex["id"].split("/")[1])]["input"] == ex["input"]  # ids = the row in the task file
    golds = [ex["gold"] for ex in examples]
    adversarial = ["", ")", "So the answer is False.5.", "So the answer is {g}", "{g}", "the answer is {g}.",
                   "So the answer is {g}.\n\nQ: x\nA: So the answer is (Z).", "Let's think.\n\nSo the answer is {g}.",
                   "I think it is (Z)\n\nQ: next\nA: So the answer is {g}."]
    cases = {
        "gold": ["Let's think step by step. So the answer is {g}."] * len(golds),
        "wrong": ["So the answer is (Q)."] * len(golds),
        "adversarial": [adversarial[i % len(adversarial)] for i in range(len(golds))],
    }
    for kind, templates in cases.items():
        outs = [t.format(g=g) for t, g in zip(templates, golds)]
        reply = {}
        for p, o in zip(got, outs):
            reply.setdefault(p, []).append(o)  # causal_judgement repeats an input: answer in order
        lm.reply = lambda p, r=reply: r[p].pop(0)
        preds = task.module.predict(lm, examples, **task.opts)
        _, _, kwargs = lm.calls[-1]
        # the HF path of 171c3f163: its "\n\n" stop never fires, so nothing but EOS/512 tokens ends it
        assert list(kwargs["stop"]) == [] and kwargs["max_new_tokens"] == 512 and kwargs.get("temperature", 0) == 0
        per_task_outs, i = {}, 0
        for t in all_tasks:
            per_task_outs[t] = outs[i:i + len(all_tasks[t])]
            i += len(all_tasks[t])
        assert task.module.score(preds)["exact_match"] == pytest.approx(oi_bbh_score(all_tasks, per_task_outs)), kind


def test_bbh_reads_the_whole_generation_under_open_instruct_and_stops_under_corrected(eval_data, char_tokenizer, stub_lm):
    """Issue 27: "I think it is X\n\nQ: next\nA: So the answer is X." scores 1 in open-instruct's HF
    path (no effective stop, regex on the whole text); `corrected` stops at "\n\n" on plain prompts and
    reads "I think it is X", which is not the answer."""
    task = get_task("bbh")
    examples = task.module.load(eval_data, subtasks=["web_of_lies"], **task.opts)
    all_tasks, _ = oi_bbh(eval_data)
    golds = [ex["gold"] for ex in examples]
    text = "I think it is {g}\n\nQ: next\nA: So the answer is {g}."
    scores = {}
    for profile in ("open_instruct", "corrected"):
        lm = stub_lm(char_tokenizer, chat_format=None)
        answers = iter(text.format(g=g) for g in golds)

        def generate(prompts, stop=(), **kwargs):  # the stub honours stop strings, as LM.generate does
            outs = []
            for _ in prompts:
                o = next(answers)
                for s_ in stop:
                    o = o.split(s_)[0]
                outs.append([o])
            return outs

        lm.generate = generate
        scores[profile] = task.module.score(task.module.predict(lm, examples, profile=profile), profile=profile)["exact_match"]
    full = [text.format(g=ex["target"]) for ex in all_tasks["web_of_lies"]]
    assert scores["open_instruct"] == oi_bbh_score({"web_of_lies": all_tasks["web_of_lies"]}, {"web_of_lies": full}) == 1.0
    assert scores["corrected"] == 0.0


def test_bbh_subtasks_keep_the_ids_of_the_full_run(eval_data):
    task = get_task("bbh")
    full = {ex["id"] for ex in task.module.load(eval_data, **task.opts) if ex["task"] == "web_of_lies"}
    sub = {ex["id"] for ex in task.module.load(eval_data, subtasks=["web_of_lies"], **task.opts)}
    assert sub == full and len(sub) == 40


# --- TyDi QA: eval/tydiqa/run_eval.py --------------------------------------------------------------

OI_TEMPLATES_SHA256 = "bb76f17c682d73c24d70d1f6e031d5dc8313a44b1ee05f12cb3412c5746b0555"  # the two template dicts


def oi_templates():
    from qtulu.evals.tasks.tydiqa import WITH_CONTEXT, WITHOUT_CONTEXT

    blob = json.dumps([WITH_CONTEXT, WITHOUT_CONTEXT], ensure_ascii=False).encode()
    assert hashlib.sha256(blob).hexdigest() == OI_TEMPLATES_SHA256  # data checked against open-instruct's file
    return WITH_CONTEXT, WITHOUT_CONTEXT


def write_goldp(root, seed=0):
    """tydiqa/ dev and train files in TyDi QA GoldP's layout: 4 languages, more than 100 questions in
    three of them, passages from a few words to far over 512 tokens."""
    rng = random.Random(seed)
    words = ["river", "capital", "the", "Helsinki", "Москва", "서울", "ایران", "1,024", "année", "—", "(1901)", "a"]

    def article(lang, n_q, prefix):
        paras = []
        for p in range(max(1, n_q // 3)):
            ctx = " ".join(rng.choice(words) for _ in range(rng.choice([5, 60, 300, 600])))
            qas = [{"id": f"{lang}-{prefix}{p}-{q}", "question": f"Q {lang} {p} {q}?",
                    "answers": [{"text": rng.choice(words) + " " + rng.choice(words), "answer_start": 0}]}
                   for q in range(3)]
            paras.append({"context": ctx, "qas": qas})
        return {"title": lang, "paragraphs": paras}

    counts = {"english": 130, "finnish": 105, "arabic": 30, "korean": 103}
    dev = {"data": [article(lang, n, "d") for lang, n in counts.items()]}
    train = {"data": [article(lang, 12, "t") for lang in counts]}
    (root / "tydiqa").mkdir()
    (root / "tydiqa" / "tydiqa-goldp-v1.1-dev.json").write_text(json.dumps(dev, ensure_ascii=False), encoding="utf-8")
    (root / "tydiqa" / "tydiqa-goldp-v1.1-train.json").write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    return root


def oi_tydiqa(data_dir, tokenizer, *, no_context=False, use_chat_format=False, n_shot=1, max_per_lang=100,
              max_context_length=512):
    """open-instruct's data loading, sampling, passage cutting and prompts. The one deviation:
    ``sorted(set(...))`` for the languages (171c3f163 iterates the set, whose order changes with
    PYTHONHASHSEED; 2771cb2d4 sorts it, as qtulu does)."""
    with_ctx, without_ctx = oi_templates()
    state = random.getstate()
    try:
        random.seed(42)
        test_data = []
        with open(os.path.join(data_dir, "tydiqa", "tydiqa-goldp-v1.1-dev.json")) as fin:
            for article in json.load(fin)["data"]:
                for paragraph in article["paragraphs"]:
                    for qa in paragraph["qas"]:
                        test_data.append({"id": qa["id"], "lang": qa["id"].split("-")[0], "context": paragraph["context"],
                                          "question": qa["question"], "answers": qa["answers"]})
        data_languages = sorted(set([example["lang"] for example in test_data]))
        sampled = []
        for lang in data_languages:
            examples_for_lang = [example for example in test_data if example["lang"] == lang]
            if len(examples_for_lang) > max_per_lang:
                examples_for_lang = random.sample(examples_for_lang, max_per_lang)
            sampled += examples_for_lang
        test_data = sampled
        train_data_for_langs = {lang: [] for lang in data_languages}
        with open(os.path.join(data_dir, "tydiqa", "tydiqa-goldp-v1.1-train.json")) as fin:
            for article in json.load(fin)["data"]:
                for paragraph in article["paragraphs"]:
                    for qa in paragraph["qas"]:
                        lang = qa["id"].split("-")[0]
                        if lang in data_languages:
                            train_data_for_langs[lang].append({"id": qa["id"], "lang": lang, "context": paragraph["context"],
                                                               "question": qa["question"], "answers": qa["answers"]})
        for lang in data_languages:
            train_data_for_langs[lang] = random.sample(train_data_for_langs[lang], n_shot)
    finally:
        random.setstate(state)
    for example in test_data + [e for lang in data_languages for e in train_data_for_langs[lang]]:
        tokenized_context = tokenizer.encode(example["context"])
        if len(tokenized_context) > max_context_length:
            example["context"] = tokenizer.decode(tokenized_context[:max_context_length])
    prompts = []
    for example in test_data:
        lang = example["lang"]
        if no_context:
            prompt, q_template, a_template = without_ctx[lang]
            p_template = ""
        else:
            prompt, p_template, q_template, a_template = with_ctx[lang]
        prompt += "\n\n"
        demos = []
        for train_example in train_data_for_langs[lang]:
            if no_context:
                demos.append(q_template + " " + train_example["question"] + "\n" + a_template + " "
                             + train_example["answers"][0]["text"])
            else:
                demos.append(p_template + " " + train_example["context"] + "\n" + q_template + " "
                             + train_example["question"] + "\n" + a_template + " " + train_example["answers"][0]["text"])
        prompt += "\n\n".join(demos) + "\n\n"
        if no_context:
            prompt += q_template + " " + format(example["question"]) + "\n"
        else:
            prompt += p_template + " " + format(example["context"]) + "\n" + q_template + " " + format(example["question"]) + "\n"
        if use_chat_format:
            prompt = oi_tulu_chat(prompt)
            prompt += a_template if prompt[-1] in ["\n", " "] else " " + a_template
        else:
            prompt += a_template
        prompts.append(prompt)
    return test_data, prompts


def oi_squad_by_language(test_data, outputs):
    """evaluate.load("squad") per language (metrics/squad/compute_score.py), then the mean F1."""
    def norm(s):
        s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())

    def f1(p, g):
        p, g = norm(p).split(), norm(g).split()
        same = sum((Counter(p) & Counter(g)).values())
        return 0 if same == 0 else 2 * (same / len(p)) * (same / len(g)) / (same / len(p) + same / len(g))

    scores = {}
    for lang in sorted({e["lang"] for e in test_data}):
        rows = [(e, o) for e, o in zip(test_data, outputs) if e["lang"] == lang]
        scores[lang] = 100.0 * sum(max(f1(o, a["text"]) for a in e["answers"]) for e, o in rows) / len(rows)
    return np.mean(list(scores.values()))


@pytest.mark.parametrize("name,chat", [("tydiqa", False), ("tydiqa", True), ("tydiqa_nocontext", True)])
def test_tydiqa_subset_prompts_and_scores_equal_open_instruct(tmp_path, llama_tok_bos, stub_lm, name, chat):
    data = write_goldp(tmp_path)
    task = get_task(name)
    examples = task.module.load(data, **task.opts)
    test_data, want = oi_tydiqa(data, llama_tok_bos, no_context=task.opts["no_context"], use_chat_format=chat)
    lm = stub_lm(llama_tok_bos, chat_format="tulu" if chat else None)
    got = [task.module.build_prompt(lm, ex, no_context=task.opts["no_context"]) for ex in examples]
    assert len(got) == 100 + 30 + 100 + 100 and got == want
    assert [ex["id"] for ex in examples] == [e["id"] for e in test_data]
    if not task.opts["no_context"]:  # a cut passage: 511 tokens after the BOS, whose text "<s>" stays in the prompt
        assert any("Passage: <s> " in p for p in got)
    gold = [" " + e["answers"][0]["text"] + "\n" for e in test_data]
    lm.reply = lambda p, r=dict(zip(got, gold)): r[p]
    preds = task.module.predict(lm, examples, **task.opts)
    _, prompts, kwargs = lm.calls[-1]
    assert prompts == want and kwargs["stop"] == ["\n"] and kwargs["max_new_tokens"] == 50
    outputs = {"gold": gold, "wrong": ["Lyon" for _ in test_data],
               "adversarial": [["", " The " + e["answers"][0]["text"] + "!", "a", e["answers"][0]["text"].upper()][i % 4]
                               for i, e in enumerate(test_data)]}
    for kind, outs in outputs.items():
        scored = [{**p, "prediction": o.strip()} for p, o in zip(preds, outs)]  # predict strips, as open-instruct
        want_f1 = oi_squad_by_language(test_data, [o.strip() for o in outs])
        assert 100 * task.module.score(scored)["f1"] == pytest.approx(want_f1), kind
    assert [p["prediction"] for p in preds] == [o.strip() for o in gold]


def test_tydiqa_corrected_cuts_without_bos(tmp_path, llama_tok_bos, stub_lm):
    from qtulu.evals.tasks.tydiqa import clip

    lm = stub_lm(llama_tok_bos, chat_format=None)
    text = " ".join(["river"] * 700)
    cut = clip(lm, text, 512, profile="corrected")
    assert not cut.startswith("<s>") and len(lm.tokens(cut)) == 512
    assert clip(lm, text, 512).startswith("<s> ") and len(lm.tokens(clip(lm, text, 512))) == 512  # "<s>" + 511


def test_results_md_states_the_subset_order_rule():
    from qtulu.evals.report import SUBSET_ORDER_NOTE, markdown_table

    row = {"score": 0.5, "profile": "open_instruct", "subset": "40 per task", "n": 1080, "metric": "em", "comparable": True}
    with_bbh = markdown_table({"results": {"base": {"bbh": row}}, "versions": {"bbh": "2.1"}, "config": {}})
    assert SUBSET_ORDER_NOTE in with_bbh and "`glob` order" in SUBSET_ORDER_NOTE and "sorted order" in SUBSET_ORDER_NOTE
    without = markdown_table({"results": {"base": {"mmlu": row}}, "versions": {"mmlu": "1"}, "config": {}})
    assert SUBSET_ORDER_NOTE not in without
