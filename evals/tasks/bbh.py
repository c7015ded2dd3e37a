"""BIG-Bench Hard: 27 tasks, each with the 3-shot chain-of-thought prompt of ``bbh/cot-prompts``
(or the same exemplars answering directly); exact match of the extracted answer, averaged over
tasks. Headline: the unweighted mean of the 27 per-task exact matches on 40 examples per task.

``open_instruct`` profile = eval/bbh/run_eval.py at 171c3f163 with scripts/eval/bbh.sh's settings
(``--max_num_examples_per_task 40``):

- ``random.seed(42)`` then ``random.sample(examples, 40)`` for each task in turn, one generator for
  all; open-instruct takes the tasks in ``glob`` order (the file system's listing order, which no
  two machines need share); qtulu takes them in sorted order, which is open-instruct's order
  wherever the listing is sorted;
- the prompt file minus its first two lines (canary, "-----"), stripped, then "\\n\\nQ: " + input;
  plain prompts end "\\nA:", chat prompts "<|assistant|>\\nA:"; direct answers rebuild each
  exemplar as its question + "\\nA: " + what follows "So the answer is" (trailing period kept);
- greedy, 512 new tokens, no stop but the model's EOS: the paper's numbers came from the HF path
  (eval/utils.py generate_completions), whose stop ``tokenizer.encode("\\n\\n")[-2:]`` is passed as
  ``[[stop]]``, one list too deep (``[[[13, 13]]]``), so neither KeyWordsCriteria nor the post-hoc
  cut ever matches; the answer regex below then reads the WHOLE generation ("I think it is X\\n\\nQ:
  next\\nA: So the answer is X." reads "X"). (The same file's vLLM path stops at "\\n\\n".)
- answer = the text between the first "So the answer is " and the next period on that line
  ("False.5." reads "False"; no period: no match), else the output's first paragraph; scored with
  HF evaluate's exact_match ignoring case and punctuation. Punctuation is deleted, not stripped: a
  dyck-languages gold "] ]" becomes " ", which an empty or ")" answer does not match (qtulu 1.0
  stripped it to "" and scored constant answers 1.0 on that task).

``corrected``: answer after "the answer is" up to a sentence-ending period, a newline or the end
(dyck answers have no period), compared ignoring case, runs of whitespace and one trailing period
but keeping punctuation; plain prompts stop at "\\n\\n" (the stop the HF path meant), chat
prompts at the model's EOS (open-instruct 2023-12).

Data: ``bbh/bbh/TASK.json`` (``{"examples": [{"input", "target"}]}``), ``bbh/cot-prompts/TASK.txt``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..metrics import bbh_answer, bbh_norm, hf_exact_match, oi_bbh_answer
from ._common import PROFILE_OPTION, TaskDataError, check_profile, comparability, head, require

NAME = "bbh"
VERSION = "2.1"  # 2.1: open_instruct generates with no stop string, as its HF path did
DATA_SUBDIR = "bbh"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "cot": (True, "chain-of-thought 3-shot prompts (False: the same shots with direct answers)"),
    "subtasks": (None, "list of BBH subtask names to run (None: all 27)"),
    "max_num_examples_per_task": (40, "examples sampled per task with `seed` (the paper: 40; None: all 6,511)"),
    "seed": (42, "seed of the per-task sampling"),
    "max_new_tokens": (512, "longest generation per example"),
    "profile": PROFILE_OPTION,
}


def read_prompt(path: Path, cot: bool = True) -> str:
    """The few-shot prompt of ``path`` as open-instruct builds it (stripped)."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if len(lines) < 3 or not lines[1].startswith("-----"):
        raise TaskDataError(f"{path}: expected a canary line then '-----' before the prompt")
    prompt = "".join(lines[2:])
    if not cot:
        fields = []
        for field in prompt.split("\n\n"):
            if field.startswith("Q:"):
                if "So the answer is" not in field or "\nA:" not in field:
                    raise TaskDataError(f"{path}: an exemplar lacks 'So the answer is' or '\\nA:'")
                field = field.split("\nA:")[0].strip() + "\nA: " + field.split("So the answer is")[-1].strip()
            fields.append(field)
        prompt = "\n\n".join(fields)
    return prompt.strip()


def load(data_dir, *, limit=None, cot=True, subtasks=None, max_num_examples_per_task=40, seed=42,
         profile="open_instruct", **_):
    """The sampled examples of every task (``limit``: the first N of each task's sample), each
    carrying its task's few-shot prompt."""
    check_profile(profile)
    root = require(Path(data_dir) / DATA_SUBDIR, "BBH data")
    task_dir = require(root / "bbh", "BBH task files")
    names = sorted(p.stem for p in task_dir.glob("*.json"))
    if not names:
        raise TaskDataError(f"no BBH task files in {task_dir}")
    rng = random.Random(seed)  # open-instruct: random.seed(42) once, every task sampled in turn
    examples = []
    for name in names:
        path = task_dir / f"{name}.json"
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TaskDataError(f"{path}: expected {{'examples': [...]}} ({e})") from e
        order = list(range(len(rows)))
        if max_num_examples_per_task:
            if len(rows) < max_num_examples_per_task:
                raise TaskDataError(f"{path}: {len(rows)} examples < max_num_examples_per_task="
                                    f"{max_num_examples_per_task}")
            order = rng.sample(order, max_num_examples_per_task)
        if subtasks and name not in subtasks:
            continue  # sampled all the same, so a subset keeps the ids of the full run
        fewshot = read_prompt(require(root / "cot-prompts" / f"{name}.txt", "BBH prompt"), cot)
        for i in head(order, limit):
            examples.append({"id": f"{name}/{i}", "task": name, "fewshot": fewshot,
                             "input": rows[i]["input"], "gold": rows[i]["target"]})
    if subtasks:
        missing = set(subtasks) - set(names)
        if missing:
            raise TaskDataError(f"BBH tasks not in {task_dir}: {sorted(missing)}")
    return examples


def build_prompt(lm, example) -> str:
    text = example["fewshot"] + "\n\nQ: " + example["input"]
    if lm.chat_format is None:
        return text + "\nA:"
    return lm.chat_then(text, "A:")


def stops(lm, profile: str) -> list[str]:
    if profile == "open_instruct":
        return []  # the paper-era HF path: its "\n\n" stop never fired (module docstring)
    return ["\n\n"] if lm.chat_format is None else []


def extract(output: str, profile: str = "open_instruct") -> str:
    return oi_bbh_answer(output) if profile == "open_instruct" else bbh_answer(output)


def predict(lm, examples, *, max_new_tokens=512, profile="open_instruct", **_):
    outs = lm.generate([build_prompt(lm, ex) for ex in examples], max_new_tokens=max_new_tokens,
                       stop=stops(lm, profile))
    return [{"id": ex["id"], "task": ex["task"], "output": o[0], "prediction": extract(o[0], profile),
             "gold": ex["gold"]} for ex, o in zip(examples, outs)]


def task_hits(predictions, profile: str = "open_instruct") -> dict[str, list[bool]]:
    by_task: dict[str, list[dict]] = {}
    for p in predictions:
        by_task.setdefault(p["task"], []).append(p)
    out = {}
    for task, preds in sorted(by_task.items()):
        answers = [extract(p["output"], profile) for p in preds]
        golds = [p["gold"] for p in preds]
        if profile == "open_instruct":
            out[task] = hf_exact_match(answers, golds, ignore_case=True, ignore_punctuation=True)
        else:
            out[task] = [bbh_norm(a) == bbh_norm(g) for a, g in zip(answers, golds)]
    return out


def score(predictions, *, profile="open_instruct", **_):
    check_profile(profile)
    per_task = {t: sum(h) / len(h) for t, h in task_hits(predictions, profile).items()}
    avg = sum(per_task.values()) / len(per_task) if per_task else float("nan")
    return {"score": avg, "exact_match": avg, "n": len(predictions), "per_task": per_task}


def describe(*, limit=None, cot=True, subtasks=None, max_num_examples_per_task=40, seed=42,
             profile="open_instruct", max_new_tokens=512, **_) -> dict:
    dev = [f"{k} {v}" for k, v, paper in (("cot", cot, True), ("max_num_examples_per_task", max_num_examples_per_task, 40),
                                            ("seed", seed, 42), ("max_new_tokens", max_new_tokens, 512)) if v != paper]
    if subtasks:
        dev.append("a subset of tasks")
    ok, note = comparability(profile, limit, dev)
    n = ("all examples" if not max_num_examples_per_task
         else f"{max_num_examples_per_task} per task sampled with random.seed({seed}), tasks in sorted order")
    return {"profile": profile, "subset": n + ("" if limit is None else f", first {limit} per task"),
            "metric": "exact match, mean over tasks", "comparable": ok, "note": note}
