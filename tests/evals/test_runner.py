"""evaluate(): adapters swapped on one base, outputs on disk, batch-size independence, re-scoring,
judge- and classifier-scored tasks."""

from __future__ import annotations

import json

import pytest

from qtulu.evals.runner import evaluate, read_jsonl
from qtulu.evals.tasks import get_task

OPTS = {"mmlu": {"subjects": ["world_religions", "global_facts"]}, "gsm8k": {"max_new_tokens": 4},
        "tydiqa": {"max_new_tokens": 4}}


@pytest.fixture
def data_root(eval_data, tydiqa_dir):
    """The shared eval data plus the TyDi QA fixture, under one root."""
    for name in ("mmlu", "gsm"):
        (tydiqa_dir / name).symlink_to(eval_data / name)
    return tydiqa_dir


def test_adapters_base_outputs_and_report(lora_pair, data_root, tmp_path):
    model, tok = lora_pair
    out = tmp_path / "out"
    res = evaluate(model, tok, "mmlu,tydiqa", data_dir=data_root, out_dir=out,
                   adapters=["base", "alpha", "beta"], batch_size=4, limit=2, task_options=OPTS, progress=False)
    assert list(res["results"]) == ["base", "alpha", "beta"]
    assert res["versions"] == {"mmlu": "2.0", "tydiqa": "2.0"}
    for f in ("results.json", "results.md", "results.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| task | base | alpha | beta |" in table and "mmlu v2.0" in table
    # per task: profile, subset, metric, comparability with the paper's table
    assert "| mmlu | open_instruct | all test questions of the given subjects, first 2 per subject (no sampling) (n=4) " \
           "| accuracy over all questions (micro average) | not comparable: limit 2; a subset of subjects |" in table
    assert "| tydiqa | open_instruct | 100 per language sampled with random.seed(42), languages sorted" in table
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"]["alpha"]["mmlu"]["n"] == 4
    for label in ("base", "alpha", "beta"):
        for task in ("mmlu", "tydiqa"):
            preds = read_jsonl(out / label / task / "predictions.jsonl")
            assert preds and all("id" in p for p in preds)
            m = json.loads((out / label / task / "metrics.json").read_text())
            assert m["version"] == "2.0" and m["profile"] == "open_instruct" and m["comparable"] is False
    # each adapter changes the model: MMLU letter log-probs differ between base, alpha and beta
    lps = {lab: [p["logprobs"] for p in read_jsonl(out / lab / "mmlu" / "predictions.jsonl")]
           for lab in ("base", "alpha", "beta")}
    assert lps["base"] != lps["alpha"] != lps["beta"] != lps["base"]


def test_base_label_equals_plain_model(lora_pair, tiny, eval_data, tmp_path):
    model, tok = lora_pair
    plain, _ = tiny
    a = evaluate(model, tok, ["mmlu"], data_dir=eval_data, out_dir=tmp_path / "a", adapters=["base"], limit=2,
                 task_options=OPTS, progress=False, report=False)
    b = evaluate(plain, tok, ["mmlu"], data_dir=eval_data, out_dir=tmp_path / "b", limit=2, chat_format=None,
                 task_options=OPTS, progress=False, report=False)
    pa = read_jsonl(tmp_path / "a" / "base" / "mmlu" / "predictions.jsonl")
    pb = read_jsonl(tmp_path / "b" / "model" / "mmlu" / "predictions.jsonl")
    assert [p["prediction"] for p in pa] == [p["prediction"] for p in pb]
    assert a["results"]["base"]["mmlu"]["acc"] == b["results"]["model"]["mmlu"]["acc"]
    assert a["results"]["base"]["mmlu"]["chat_format"] is None  # base models get plain prompts


def test_a_model_evaluated_as_is_gets_the_chat_format_even_when_named_base(tiny, eval_data, tmp_path):
    # `qtulu eval --model demo_out/base` (no adapter) labels the row "base" after the folder: it is
    # a model as is, so --chat-format applies (only the adapters-disabled row gets plain prompts)
    plain, tok = tiny
    res = evaluate(plain, tok, ["mmlu"], data_dir=eval_data, out_dir=tmp_path, limit=1, chat_format="tulu",
                   model_name="base", task_options=OPTS, progress=False, report=False)
    assert res["results"]["base"]["mmlu"]["chat_format"] == "tulu"


def test_predictions_identical_at_batch_1_and_8(lora_pair, data_root, tmp_path):
    model, tok = lora_pair
    preds = {}
    for bs in (1, 8):
        evaluate(model, tok, "mmlu,tydiqa_nocontext", data_dir=data_root, out_dir=tmp_path / str(bs),
                 adapters=["alpha"], batch_size=bs, limit=5,
                 task_options={"mmlu": OPTS["mmlu"], "tydiqa_nocontext": {"max_new_tokens": 8}},
                 progress=False, report=False)
        preds[bs] = {t: [(p["id"], p["prediction"]) for p in
                         read_jsonl(tmp_path / str(bs) / "alpha" / t / "predictions.jsonl")]
                     for t in ("mmlu", "tydiqa_nocontext")}
    assert len(preds[1]["mmlu"]) == 10 and len(preds[1]["tydiqa_nocontext"]) == 3
    assert preds[1] == preds[8]


def test_rescore_cli_matches(lora_pair, eval_data, tmp_path, capsys):
    from qtulu.cli import main

    model, tok = lora_pair
    res = evaluate(model, tok, ["gsm8k"], data_dir=eval_data, out_dir=tmp_path, adapters=["beta"], limit=2,
                   task_options=OPTS, progress=False, report=False)
    path = tmp_path / "beta" / "gsm8k" / "predictions.jsonl"
    assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(path), "--data-dir", str(eval_data),
                 "--out", str(tmp_path / "rescored.json")]) == 0
    rescored = json.loads((tmp_path / "rescored.json").read_text())
    assert rescored["exact_match"] == res["results"]["beta"]["gsm8k"]["exact_match"]
    # gold answers written into the file score 100% on re-scoring
    rows = read_jsonl(path)
    path.write_text("".join(json.dumps({**r, "output": f"So the answer is {r['gold']}."}) + "\n" for r in rows))
    assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exact_match"] == 1.0
    # predictions that do not belong to the data are refused, naming the file
    path.write_text(json.dumps({"id": "no-such-id", "output": "1", "gold": "1"}) + "\n")
    assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(path), "--data-dir", str(eval_data)]) == 2
    assert "no-such-id" in capsys.readouterr().err


def test_missing_judge_classifier_or_opt_in_fail_before_generation(tiny, eval_data, tmp_path):
    from qtulu.evals.judge import JudgeNotConfigured
    from qtulu.evals.sandbox import CodeExecutionRefused
    from qtulu.evals.tasks.toxigen import ClassifierNotConfigured

    model, tok = tiny
    with pytest.raises(JudgeNotConfigured, match="--judge-url URL --judge-model NAME"):
        evaluate(model, tok, ["alpaca_eval"], data_dir=eval_data, out_dir=tmp_path, progress=False)
    with pytest.raises(ClassifierNotConfigured, match="--toxigen-classifier"):
        evaluate(model, tok, ["toxigen"], data_dir=eval_data, out_dir=tmp_path, progress=False)
    with pytest.raises(CodeExecutionRefused):
        evaluate(model, tok, ["codex_humaneval"], data_dir=eval_data, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "model").exists()


def test_alpaca_eval_win_rate_with_judge(fake_judge, eval_data):
    from qtulu.evals.judge import Judge
    from qtulu.evals.tasks import alpaca_eval

    examples = alpaca_eval.load(eval_data)
    assert len(examples) == 805
    # model answers "GOOD" on even ids; the judge ranks the output that says GOOD first, else the reference
    preds = [{**ex, "output": "GOOD" if int(ex["id"]) % 2 == 0 else "meh"} for ex in examples[:40]]

    def reply(messages):
        text = messages[-1]["content"]
        first = text.split('"model": "model_1",', 1)[1].split('"""', 2)[1]
        model_1_best = first == "GOOD" or ("GOOD" not in text and first != "meh")
        return str([{"model": "model_1", "rank": 1 if model_1_best else 2},
                    {"model": "model_2", "rank": 2 if model_1_best else 1}])

    fake_judge["reply"] = reply
    metrics = alpaca_eval.score(preds, judge=Judge(fake_judge["url"], "judge-model"))
    assert metrics["win_rate"] == 0.5 and metrics["n"] == 40 and metrics["invalid_verdicts"] == 0
    assert fake_judge["requests"][0]["path"] == "/v1/chat/completions"
    assert fake_judge["requests"][0]["body"]["model"] == "judge-model"
    fake_judge["reply"] = lambda m: "I cannot decide"
    assert alpaca_eval.score(preds[:3], judge=Judge(fake_judge["url"], "j"))["invalid_verdicts"] == 3


def test_truthfulqa_generation_judged(fake_judge, eval_data):
    from qtulu.evals.judge import Judge
    from qtulu.evals.tasks import truthfulqa

    examples = truthfulqa.load(eval_data, limit=4)
    preds = [{"id": e["id"], "question": e["question"], "output": e["best"]} for e in examples]
    fake_judge["top"] = lambda prompt: {" yes": -0.1} if prompt.endswith("True:") else {" no": -0.1, " yes": -2.3}
    metrics = truthfulqa.score(preds, mode="gen", judge=Judge(fake_judge["url"], "j"))
    assert metrics["pct_true"] == 1.0 and metrics["pct_info"] == 0.0 and metrics["pct_true_info"] == 0.0


def test_toxigen_groups_and_classifier(eval_data):
    from qtulu.evals.tasks import toxigen

    examples = toxigen.load(eval_data)
    groups = {e["group"] for e in examples}
    assert len(groups) == 14 and len(examples) == 14 * 500  # open-instruct's groups
    assert all("\\n" not in e["text"] for e in examples)
    preds = [{"id": e["id"], "group": e["group"], "output": "bad" if e["group"] == "women" else "fine"}
             for e in examples]
    metrics = toxigen.score(preds, classifier=lambda texts: [t == "bad" for t in texts])
    assert metrics["per_group"]["women"] == 1.0 and metrics["pct_toxic"] == pytest.approx(1 / 14)


def test_toxigen_classifier_from_a_saved_model(tmp_path):
    """A transformers sequence classifier given by path: its argmax decides 'toxic' (label 1 here)."""
    from transformers import LlamaForSequenceClassification

    from qtulu.evals.tasks import toxigen
    from qtulu.model.tiny import build_char_tokenizer, tiny_llama_config

    torch_mod = pytest.importorskip("torch")
    torch_mod.manual_seed(0)
    clf = LlamaForSequenceClassification(tiny_llama_config(num_labels=2, id2label={0: "benign", 1: "toxic"})).eval()
    clf.save_pretrained(tmp_path / "clf")
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path / "clf")
    texts = ["you are all", "a nice day", "x", "some longer statement about a group"]
    got = toxigen.classify(texts, str(tmp_path / "clf"), batch_size=3)
    want = []
    for t in texts:
        ids = tok(t, return_tensors="pt")
        with torch_mod.no_grad():
            want.append(int(clf(**ids).logits.argmax(-1)) == 1)
    assert got == want


@pytest.mark.parametrize("profile", ["open_instruct", "corrected"])
def test_every_task_runs_under_both_profiles(eval_data, tydiqa_dir, char_tokenizer, stub_lm, fake_judge, tmp_path,
                                             profile):
    """load -> predict -> score -> describe for every task variant (HumanEval: up to predict; its
    execution is the sandbox's tests), with a model-less LM: options, profiles and records fit."""
    from qtulu.evals.judge import Judge
    from qtulu.evals.runner import run_task
    from qtulu.evals.tasks import parse_task_list

    for sub in eval_data.iterdir():
        if not (tydiqa_dir / sub.name).exists():
            (tydiqa_dir / sub.name).symlink_to(sub)
    fake_judge["reply"] = lambda m: "[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]"
    ctx = {"judge": Judge(fake_judge["url"], "j"), "classifier": lambda texts: [False] * len(texts)}
    lm = stub_lm(char_tokenizer, chat_format="tulu", reply=lambda p: " So the answer is 3.")
    for name in parse_task_list("all"):  # the paper's suite (the synthetic demo skills have their own tests)
        if name.startswith("codex"):
            task = get_task(name, profile=profile)
            examples = task.module.load(tydiqa_dir, limit=2, **task.opts)
            assert task.module.predict(lm, examples, allow_code_execution=True, **task.opts)[0]["completions"]
            continue
        m = run_task(lm, name, data_dir=tydiqa_dir, out_dir=tmp_path / profile / name, limit=2,
                     score_context=ctx, profile=profile)
        assert m["profile"] == profile and m["comparable"] is False and "limit 2" in m["comparability"], name
        assert isinstance(m["score"], float) and m["subset"] and m["metric"], name
        assert (tmp_path / profile / name / "predictions.jsonl").exists()
