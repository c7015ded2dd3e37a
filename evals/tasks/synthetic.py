"""The synthetic skills of `qtulu demo` (``qtulu.demo.synthetic``) as an eval task: held-out exact match.

Not a benchmark of the paper: it lets ``qtulu eval`` (and a study over adapters) run offline on
the demo's own artefacts::

    qtulu eval --model demo_out/base --adapter demo_out/runs/upper/adapter \
        --adapter demo_out/runs/successor/adapter --include-base \
        --tasks synthetic_upper,synthetic_successor --data-dir demo_out/data --out demo_out/eval

Data: ``DATA_DIR/SKILL_test.jsonl`` as the demo writes it (``{"messages": [user, assistant]}``
rows; the user turn is the prompt, the assistant turn the exact answer). Greedy decoding; the
reply, stripped, must equal the answer (the demo's own table scores the same way).
"""

from __future__ import annotations

from pathlib import Path

from ._common import TaskDataError, head, jsonl_rows, require

NAME = "synthetic"
VERSION = "1.0"
DATA_SUBDIR = ""  # the demo's data folder itself (demo_out/data)
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "skill": (None, "skill to score: reads DATA_DIR/SKILL_test.jsonl (None: every *_test.jsonl there)"),
    "max_new_tokens": (8, "longest reply (the answers are 4 characters)"),
    "profile": ("open_instruct", "accepted like every task's; one scoring here (exact match)"),
}


def _files(data_dir, skill):
    root = require(Path(data_dir), "synthetic data folder (qtulu demo's OUT/data)")
    if skill:
        return [require(root / f"{skill}_test.jsonl", f"synthetic skill {skill!r}")]
    files = sorted(root.glob("*_test.jsonl"))
    if not files:
        raise TaskDataError(f"no *_test.jsonl files in {root} (run `qtulu demo` and pass --data-dir OUT/data)")
    return files


def load(data_dir, *, limit=None, skill=None, **_):
    examples = []
    for path in _files(data_dir, skill):
        name = path.name[: -len("_test.jsonl")]
        rows = []
        bad = "expected {'messages': [user, assistant]}"
        for lineno, row in jsonl_rows(path, bad):
            try:
                user, assistant = row["messages"]
                rows.append({"id": f"{name}/{lineno - 1}", "skill": name, "prompt": user["content"],
                             "gold": assistant["content"]})
            except (KeyError, TypeError, ValueError) as e:
                raise TaskDataError(f"{path}:{lineno}: {bad} ({e})") from e
        examples += head(rows, limit)
    return examples


def predict(lm, examples, *, max_new_tokens=8, **_):
    outs = lm.generate([lm.chat(ex["prompt"]) for ex in examples], max_new_tokens=max_new_tokens,
                       stop=["\n", "<|user|>"])
    return [{"id": ex["id"], "skill": ex["skill"], "output": o[0], "prediction": o[0].strip(), "gold": ex["gold"]}
            for ex, o in zip(examples, outs)]


def score(predictions, **_):
    if not predictions:
        return {"score": float("nan"), "n": 0}
    by_skill: dict[str, list[bool]] = {}
    for p in predictions:
        by_skill.setdefault(p["skill"], []).append(p["prediction"] == p["gold"])
    per = {k: sum(v) / len(v) for k, v in by_skill.items()}
    return {"score": sum(per.values()) / len(per), "n": len(predictions), "per_skill": per}


def describe(*, limit=None, skill=None, profile="open_instruct", **_) -> dict:
    subset = f"held-out split of {skill or 'every skill'}" + ("" if limit is None else f", first {limit}")
    return {"profile": profile, "subset": subset, "metric": "exact match (greedy)", "comparable": False,
            "note": "synthetic (qtulu demo): no paper number"}
