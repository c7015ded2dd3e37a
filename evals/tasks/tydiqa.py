"""TyDi QA GoldP: 1-shot per language with the gold passage (or without it, "no context");
SQuAD-style normalized EM and F1 per language, averaged over languages.

Data (not shipped; the official release): ``tydiqa/tydiqa-goldp-v1.1-dev.json`` and, for the
exemplar, ``tydiqa/tydiqa-goldp-v1.1-train.json``, both SQuAD-like
``{"data": [{"paragraphs": [{"context", "qas": [{"id": "english-...", "question", "answers": [{"text", "answer_start"}]}]}]}]}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..metrics import squad_scores
from ._common import TaskDataError, head, require

NAME = "tydiqa"
VERSION = "1.0"
DATA_SUBDIR = "tydiqa"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "n_shot": (1, "same-language exemplars in the prompt"),
    "seed": (42, "seed of the exemplar choice"),
    "no_context": (False, "closed-book: no passage in the prompt"),
    "max_context_tokens": (512, "passage clipped to this many tokens"),
    "max_new_tokens": (50, "longest answer"),
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


def load(data_dir, *, limit=None, n_shot=1, seed=42, **_):
    """Dev examples (``limit`` = per language), each with its ``n_shot`` train exemplars."""
    root = require(Path(data_dir) / DATA_SUBDIR, "TyDi QA GoldP data")
    dev = read_goldp(require(root / DEV_FILE, "TyDi QA GoldP dev file"))
    langs = sorted({ex["lang"] for ex in dev})
    rng = random.Random(seed)
    shots: dict[str, list[dict]] = {lang: [] for lang in langs}
    if n_shot:
        train = read_goldp(require(root / TRAIN_FILE, "TyDi QA GoldP train file (for the exemplar)"))
        for lang in langs:
            pool = [ex for ex in train if ex["lang"] == lang]
            if len(pool) < n_shot:
                raise TaskDataError(f"{root / TRAIN_FILE}: {len(pool)} {lang} examples < n_shot={n_shot}")
            shots[lang] = rng.sample(pool, n_shot)
    examples = []
    for lang in langs:
        for ex in head([e for e in dev if e["lang"] == lang], limit):
            examples.append({**ex, "shots": shots[lang]})
    return examples


def _clip(lm, text: str, max_tokens: int | None) -> str:
    if not max_tokens:
        return text
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else lm.tokenizer.decode(ids[:max_tokens])


def build_prompt(lm, ex, *, no_context=False, max_context_tokens=512) -> str:
    lang = ex["lang"]
    if no_context:
        instr, q_t, a_t = WITHOUT_CONTEXT[lang]
        demo = lambda e: f"{q_t} {e['question']}\n{a_t} {e['answers'][0]}"  # noqa: E731
        body = f"{q_t} {ex['question']}\n"
    else:
        instr, p_t, q_t, a_t = WITH_CONTEXT[lang]
        demo = lambda e: f"{p_t} {_clip(lm, e['context'], max_context_tokens)}\n{q_t} {e['question']}\n{a_t} {e['answers'][0]}"  # noqa: E731
        body = f"{p_t} {_clip(lm, ex['context'], max_context_tokens)}\n{q_t} {ex['question']}\n"
    prompt = instr + "\n\n"
    if ex["shots"]:
        prompt += "\n\n".join(demo(e) for e in ex["shots"]) + "\n\n"
    prompt += body
    if lm.chat_format is None:
        return prompt + a_t
    chat = lm.chat(prompt)
    return chat + (a_t if chat[-1] in "\n " else " " + a_t)


def predict(lm, examples, *, no_context=False, max_context_tokens=512, max_new_tokens=50, **_):
    prompts = [build_prompt(lm, ex, no_context=no_context, max_context_tokens=max_context_tokens) for ex in examples]
    stop = ["\n"] if lm.chat_format is None else ["<|user|>"]
    outs = lm.generate(prompts, max_new_tokens=max_new_tokens, stop=stop)
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
