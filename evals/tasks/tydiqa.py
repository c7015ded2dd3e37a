"""TyDi QA GoldP: 1-shot per language with the gold passage (or without it, "no context"); SQuAD
v1.1 exact match and F1 per language, averaged over the languages. Headline: F1 with the passage,
100 questions per language.

``open_instruct`` profile = eval/tydiqa/run_eval.py at 171c3f163 with scripts/eval/tydiqa.sh's
settings (``--n_shot 1 --max_num_examples_per_lang 100 --max_context_length 512``):

- ``random.seed(42)``; for each language in turn ``random.sample`` of 100 of its dev questions, then
  (same generator) one train exemplar per language; open-instruct at 171c3f163 iterates the
  languages of a ``set``, an order that changes with PYTHONHASHSEED from run to run; qtulu uses
  sorted order, the fix open-instruct itself made later (2771cb2d4), so the ids are those of
  open-instruct run with the languages sorted;
- passages longer than 512 tokens are cut with the tokenizer's own ``encode``/``decode`` as there:
  a LLaMA tokenizer adds a BOS on ``encode``, so 511 passage tokens are kept and the decoded text
  starts with the BOS's text ("<s>"), which the prompt then carries;
- prompt: the language's instruction, the exemplar, then "Passage: ...\nQuestion: ...\n" and the
  answer cue ("Answer:"), after "<|assistant|>\n" in chat format; greedy, 50 new tokens, stop at a
  newline in both formats, output stripped;
- SQuAD v1.1 EM/F1 (``evaluate``'s "squad") per language, then the mean over languages.

``corrected``: passages are cut to 512 tokens without a BOS and decoded without special tokens;
chat prompts stop at the model's EOS (open-instruct 2023-12).

Data (not in ../shared: the official release): ``tydiqa/tydiqa-goldp-v1.1-dev.json`` and, for the
exemplars, ``tydiqa/tydiqa-goldp-v1.1-train.json``, both SQuAD-like
``{"data": [{"paragraphs": [{"context", "qas": [{"id": "english-...", "question", "answers": [{"text", "answer_start"}]}]}]}]}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..metrics import squad_scores
from ._common import PROFILE_OPTION, TaskDataError, check_profile, comparability, head, require

NAME = "tydiqa"
VERSION = "2.0"
DATA_SUBDIR = "tydiqa"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "n_shot": (1, "same-language train exemplars in the prompt"),
    "max_num_examples_per_lang": (100, "dev questions sampled per language (the paper: 100; None: all)"),
    "seed": (42, "seed of the question and exemplar sampling"),
    "no_context": (False, "closed-book: no passage in the prompt"),
    "max_context_length": (512, "passages cut to this many tokens"),
    "max_new_tokens": (50, "longest answer"),
    "profile": PROFILE_OPTION,
}
DEV_FILE = "tydiqa-goldp-v1.1-dev.json"
TRAIN_FILE = "tydiqa-goldp-v1.1-train.json"

WITH_CONTEXT = {
    "english": ("Answer the following question based on the information in the given passage.", "Passage:", "Question:", "Answer:"),
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.", "المقطع:", "السؤال:", "الإجابة:"),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।", "অধ্যায়:", "প্রশ্ন:", "উত্তর:"),
    "finnish": ("Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.", "Kappale:", "Kysymys:", "Vastaus:"),
    "indonesian": ("Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.", "Bagian:", "Pertanyaan:", "Jawaban:"),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": ("Ответьте на следующий вопрос на основе информации в данном отрывке.", "Отрывок:", "Вопрос:", "Ответ:"),
    "swahili": ("Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.", "Kifungu:", "Swali:", "Jibu:"),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}
WITHOUT_CONTEXT = {
    "english": ("Answer the following question.", "Question:", "Answer:"),
    "arabic": ("أجب على السؤال التالي.", "السؤال:", "الإجابة:"),
    "bengali": ("নিম্নলিখিত প্রশ্নের উত্তর দিন।", "প্রশ্ন:", "উত্তর:"),
    "finnish": ("Vastaa seuraavaan kysymykseen.", "Kysymys:", "Vastaus:"),
    "indonesian": ("Jawab pertanyaan berikut.", "Pertanyaan:", "Jawaban:"),
    "korean": ("다음 질문에 답하십시오.", "질문:", "답변:"),
    "russian": ("Ответьте на следующий вопрос.", "Вопрос:", "Ответ:"),
    "swahili": ("Jibu swali lifuatalo.", "Swali:", "Jibu:"),
    "telugu": ("క్రింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "ప్రశ్న:", "సమాధానం:"),
}


def read_goldp(path: Path) -> list[dict]:
    """Flatten a TyDi QA GoldP (SQuAD-schema) JSON file into QA examples with their language."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TaskDataError(f"{path}: not TyDi QA GoldP JSON ({{'data': [...]}}): {e}") from e
    out = []
    for ai, article in enumerate(data):
        for pi, para in enumerate(article.get("paragraphs", [])):
            for qa in para.get("qas", []):
                where = f"{path}: data[{ai}].paragraphs[{pi}] qa {qa.get('id')!r}"
                if "id" not in qa or "-" not in qa["id"] or not qa.get("answers"):
                    raise TaskDataError(f"{where}: needs an id 'language-...' and answers")
                lang = qa["id"].split("-")[0]
                if lang not in WITH_CONTEXT:
                    raise TaskDataError(f"{where}: unknown language {lang!r}")
                out.append({"id": qa["id"], "lang": lang, "context": para["context"],
                            "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]})
    return out


def load(data_dir, *, limit=None, n_shot=1, max_num_examples_per_lang=100, seed=42, profile="open_instruct", **_):
    """The sampled dev questions, language by language (``limit``: the first N of each language's
    sample), each with its language's ``n_shot`` train exemplars."""
    check_profile(profile)
    root = require(Path(data_dir) / DATA_SUBDIR, "TyDi QA GoldP data")
    dev = read_goldp(require(root / DEV_FILE, "TyDi QA GoldP dev file"))
    langs = sorted({ex["lang"] for ex in dev})
    rng = random.Random(seed)  # open-instruct: random.seed(42) once, every draw in this order
    picked: dict[str, list[dict]] = {}
    for lang in langs:
        pool = [ex for ex in dev if ex["lang"] == lang]
        if max_num_examples_per_lang and len(pool) > max_num_examples_per_lang:
            pool = rng.sample(pool, max_num_examples_per_lang)
        picked[lang] = pool
    shots: dict[str, list[dict]] = {lang: [] for lang in langs}
    if n_shot > 0:
        train = read_goldp(require(root / TRAIN_FILE, "TyDi QA GoldP train file (for the exemplars)"))
        for lang in langs:
            pool = [ex for ex in train if ex["lang"] == lang]
            if len(pool) < n_shot:
                raise TaskDataError(f"{root / TRAIN_FILE}: {len(pool)} {lang} examples < n_shot={n_shot}")
            shots[lang] = rng.sample(pool, n_shot)
    return [{**ex, "shots": shots[lang]} for lang in langs for ex in head(picked[lang], limit)]


def clip(lm, text: str, max_tokens: int | None, profile: str = "open_instruct", cache: dict | None = None) -> str:
    """``text`` cut to ``max_tokens`` tokens (see the module docstring for the two profiles);
    ``cache`` (a dict) remembers texts already cut (an exemplar's passage recurs in every prompt)."""
    if not max_tokens:
        return text
    if cache is not None:
        key = (text, max_tokens, profile)
        if key not in cache:
            cache[key] = clip(lm, text, max_tokens, profile)
        return cache[key]
    tok = lm.tokenizer
    if profile == "open_instruct":
        ids = tok.encode(text)  # special tokens as the tokenizer adds them (LLaMA: a BOS)
        return text if len(ids) <= max_tokens else tok.decode(ids[:max_tokens])
    ids = lm.tokens(text)
    return text if len(ids) <= max_tokens else tok.decode(ids[:max_tokens], skip_special_tokens=True)


def build_prompt(lm, ex, *, no_context=False, max_context_length=512, profile="open_instruct",
                 cache: dict | None = None) -> str:
    lang = ex["lang"]
    if no_context:
        prompt, q_t, a_t = WITHOUT_CONTEXT[lang]
        p_t = ""
    else:
        prompt, p_t, q_t, a_t = WITH_CONTEXT[lang]
    prompt += "\n\n"
    if ex["shots"]:
        demos = []
        for s in ex["shots"]:
            qa = q_t + " " + s["question"] + "\n" + a_t + " " + s["answers"][0]
            demos.append(qa if no_context else p_t + " " + clip(lm, s["context"], max_context_length, profile, cache) + "\n" + qa)
        prompt += "\n\n".join(demos) + "\n\n"
    if not no_context:
        prompt += p_t + " " + clip(lm, ex["context"], max_context_length, profile, cache) + "\n"
    prompt += q_t + " " + ex["question"] + "\n"
    if lm.chat_format is None:
        return prompt + a_t
    return lm.chat_then(prompt, a_t)


def stops(lm, profile: str) -> list[str]:
    return ["\n"] if profile == "open_instruct" or lm.chat_format is None else []


def predict(lm, examples, *, no_context=False, max_context_length=512, max_new_tokens=50, profile="open_instruct", **_):
    cache: dict = {}
    prompts = [build_prompt(lm, ex, no_context=no_context, max_context_length=max_context_length, profile=profile,
                            cache=cache) for ex in examples]
    outs = lm.generate(prompts, max_new_tokens=max_new_tokens, stop=stops(lm, profile))
    return [{"id": ex["id"], "lang": ex["lang"], "prediction": o[0].strip(), "answers": ex["answers"]}
            for ex, o in zip(examples, outs)]


def score(predictions, **_):
    by_lang: dict[str, list[tuple[float, float]]] = {}
    for p in predictions:
        by_lang.setdefault(p["lang"], []).append(squad_scores(p["prediction"], p["answers"]))
    per_lang = {lang: {"exact_match": sum(e for e, _ in s) / len(s), "f1": sum(f for _, f in s) / len(s)}
                for lang, s in sorted(by_lang.items())}
    f1 = sum(v["f1"] for v in per_lang.values()) / len(per_lang) if per_lang else float("nan")
    em = sum(v["exact_match"] for v in per_lang.values()) / len(per_lang) if per_lang else float("nan")
    return {"score": f1, "f1": f1, "exact_match": em, "n": len(predictions), "per_language": per_lang}


def describe(*, limit=None, n_shot=1, max_num_examples_per_lang=100, seed=42, no_context=False,
             max_context_length=512, max_new_tokens=50, profile="open_instruct", **_) -> dict:
    dev = [f"{k} {v}" for k, v, paper in (("n_shot", n_shot, 1), ("max_num_examples_per_lang", max_num_examples_per_lang, 100),
                                            ("seed", seed, 42), ("max_context_length", max_context_length, 512),
                                            ("max_new_tokens", max_new_tokens, 50)) if v != paper]
    if no_context:
        dev.append("no passage (the paper's column is with the gold passage)")
    ok, note = comparability(profile, limit, dev)
    n = ("all dev questions" if not max_num_examples_per_lang
         else f"{max_num_examples_per_lang} per language sampled with random.seed({seed}), languages sorted")
    return {"profile": profile, "subset": n + ("" if limit is None else f", first {limit} per language"),
            "metric": "SQuAD v1.1 F1, mean over languages", "comparable": ok, "note": note}
