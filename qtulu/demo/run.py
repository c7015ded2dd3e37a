"""`qtulu demo`: the whole product end to end on a CPU in well under a minute, offline.

1. Build a tiny LLaMA-architecture model and a character tokenizer in-process (`qtulu.model.tiny`).
2. Generate synthetic instruction datasets (`qtulu.demo.synthetic`): two skills, ``upper`` (string
   manipulation) and ``successor`` (arithmetic), each with a disjoint held-out split.
3. Warm-up pretraining (said so in the output): the base is trained, all weights, on a third
   synthetic task (``copy``: echo the argument), so that it knows the chat format and can
   reproduce characters. It is never shown ``upper`` or ``successor``.
4. Save that base (``OUT/base``: safetensors + config + tokenizer), load it back as `qtulu train`
   would (NF4), and train one QLoRA adapter per skill with `qtulu.train.run.train` (recipe
   ``recipes/demo.yaml`` -> data build -> SFTTrainer -> ``OUT/runs/SKILL/adapter``, named SKILL).
5. Load both adapters on the one base (`qtulu.adapters.store`), swap between them, and score the base and
   each adapter on every held-out split (greedy decoding, exact match).
6. Print a table, write ``OUT/loss.png`` and ``OUT/report.json`` (with wall and CPU seconds per phase).

Everything it writes is what the other commands read, so the README's tour runs on it offline:
``qtulu chat --model OUT/base --adapter OUT/runs/upper/adapter``, ``qtulu eval ... --tasks
synthetic_upper,synthetic_successor --data-dir OUT/data``, ``qtulu merge``, ``qtulu merge --full``.

Speed: the model has ~100k parameters, so torch runs it on one intra-op thread
(`qtulu.model.threads`: more threads only oversubscribe the cores on so small a model).
`benchmarks/bench_demo.py` times each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from qtulu.demo.synthetic import DEMO_SKILLS
from qtulu.files import atomic_write, atomic_write_text

# num_key_value_heads 4 (no GQA) and initializer_range 0.06 (HF's 0.02 is for wide models): the
# warm-up's copy skill then appears after ~80 steps instead of ~250 (measured over seeds 0-2).
DEMO_MODEL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, initializer_range=0.06)
DEMO_SETTINGS = dict(
    warmup_steps=120,
    warmup_batch=32,
    warmup_lr=2e-3,
    train_examples=1000,
    test_examples=100,
    adapter_steps=None,  # None: SKILL_STEPS; an int: that many for every adapter
    recipe_overrides=(),  # extra `KEY=VALUE` overrides of recipes/demo.yaml for every adapter
    model={},  # overrides of DEMO_MODEL
    threads=None,  # torch intra-op threads; None: `qtulu.model.threads.threads_for` the model size
)
# optimizer steps per adapter (recipe demo.yaml's 40 otherwise): `upper` is learnt in ~25 steps;
# `successor` needs ~80 to learn the carries (2019 -> 2020): at 40 it scores 0.91 on held-out
# numbers, all of its misses carries (measured, seed 0)
SKILL_STEPS = {"upper": 30, "successor": 80}


class _Phases:
    """Wall and CPU (user + sys of this process, all threads) seconds per phase of the demo."""

    def __init__(self) -> None:
        self.times: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timed():
            w, c = time.perf_counter(), time.process_time()
            try:
                yield
            finally:
                self.times[name] = {"wall": round(time.perf_counter() - w, 2), "cpu": round(time.process_time() - c, 2)}

        return timed()


def _say(msg: str) -> None:
    print(f"[qtulu demo] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# warm-up pretraining (plain torch: the base is trained in full, not through an adapter)


def warmup_pretrain(model, tokenizer, examples: list[dict], *, steps: int, batch_size: int, lr: float, seed: int,
                    progress: bool = True) -> list[float]:
    """Train all weights of ``model`` on ``examples`` (labels on the assistant reply); returns losses."""
    import torch
    from tqdm.auto import tqdm

    from qtulu.data.chat import tokenize_messages

    enc = [tokenize_messages(e["messages"], tokenizer) for e in examples]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    # beta2 0.95 and a constant rate after a 10% warm-up: the copy skill appears in a phase change
    # after a plateau, which a decaying rate (or beta2 0.999) delays by over a hundred steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warm if i < warm else 1.0)
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="warm-up pretraining", disable=not progress, leave=False)
    for _ in bar:
        batch = rng.sample(enc, min(batch_size, len(enc)))
        T = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), T), pad)  # (B, T)
        labels = torch.full((len(batch), T), -100)  # (B, T)
        mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
        for i, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------
# evaluation: greedy decoding, exact match


def exact_match(model, tokenizer, examples: list[dict], *, batch_size: int = 128, max_new_tokens: int | None = None) -> float:
    """Fraction of ``examples`` whose greedy reply equals ``answer`` exactly (Tulu chat prompt)."""
    import torch

    from qtulu.data.chat import render_tulu

    if not examples:
        return 0.0
    max_new = max_new_tokens or (max(len(e["answer"]) for e in examples) + 2)
    correct = 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [render_tulu([{"role": "user", "content": e["prompt"]}], add_generation_prompt=True) for e in chunk]
        rows = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tokenizer.pad_token_id)  # (B, T), left-padded
        mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, T - len(r) :] = torch.tensor(r)
            mask[i, T - len(r) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        replies = tokenizer.batch_decode(out[:, T:], skip_special_tokens=True)
        correct += sum(r.strip() == e["answer"] for r, e in zip(replies, chunk))
    return correct / len(examples)


# --------------------------------------------------------------------------------------------
# the demo


def run_demo(out_dir: str | os.PathLike = "demo_out", *, seed: int = 0, progress: bool = True,
             settings: dict[str, Any] | None = None) -> dict:
    """Run the demo end to end; returns the report (also written to ``OUT/report.json``)."""
    import torch

    cfg = {**DEMO_SETTINGS, **(settings or {})}
    saved_threads = torch.get_num_threads()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the same oversubscription, in the tokenizer
    try:
        return _run(Path(out_dir).resolve(), seed=seed, progress=progress, cfg=cfg)
    finally:
        torch.set_num_threads(saved_threads)


def _run(out: Path, *, seed: int, progress: bool, cfg: dict[str, Any]) -> dict:
    """The demo's stages in order: imports, setup, warm-up, the NF4 base, adapters, eval, report."""
    import torch

    from qtulu.model.load import base_info, load_base
    from qtulu.model.tiny import save_base

    t0, c0 = time.perf_counter(), time.process_time()
    phase = _Phases()
    with phase("imports"):  # paid once by any qtulu command that trains; timed apart from the work
        import peft  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
        import trl  # noqa: F401
        import gc

        # the imports left ~2 million long-lived objects: out of the collector's sight, each full
        # collection (HF Trainer runs one after every training run) takes ms instead of ~0.6 s
        gc.freeze()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    random.seed(seed)

    with phase("setup"):
        tok, model, model_cfg, threads = _setup_model(seed, cfg)
        splits, data_dir = _write_data(out / "data", seed, cfg)
    n_params = sum(p.numel() for p in model.parameters())

    # ---- warm-up pretraining of the base (copy task only)
    _say(f"warm-up pretraining of the base on the synthetic 'copy' task ({cfg['warmup_steps']} steps, all weights): "
         "it learns the chat format and to echo text; it never sees the demo skills")
    with phase("warmup"):
        warm_losses = warmup_pretrain(model, tok, splits["copy"]["train"], steps=cfg["warmup_steps"],
                                      batch_size=cfg["warmup_batch"], lr=cfg["warmup_lr"], seed=seed, progress=progress)
    _say(f"warm-up done in {phase.times['warmup']['wall']:.0f}s, loss {warm_losses[0]:.2f} -> {warm_losses[-1]:.3f}")

    # ---- the base on disk, loaded back as `qtulu train` loads a base: NF4 (QLoRA)
    with phase("save_base"):
        base_dir = save_base(model, tok, out / "base")
        del model
        base, tok = load_base(base_dir, quantize="nf4", compute_dtype=torch.float32, device="cpu",
                              attn_implementation="qtulu_varlen")
        info = base_info(base)
    _say(f"base saved to {base_dir} (safetensors + tokenizer) and loaded in NF4 (blocksize "
         f"{info['quantization']['blocksize']}, double quant); weights sha256 {info['weights_sha256'][:12]}...")

    base, adapters, curves = _train_adapters(base, tok, base_dir, data_dir, out, cfg, phase, progress)
    with phase("eval"):
        results, copy_acc = _evaluate(base, tok, info, adapters, splits)

    _print_table(results, copy_acc)
    with phase("report"):
        png = _plot(out / "loss.png", warm_losses, curves)
    phase.times["total"] = {"wall": round(time.perf_counter() - t0, 2), "cpu": round(time.process_time() - c0, 2)}
    report = {
        "seconds": phase.times["total"]["wall"],
        "phases": phase.times,
        "threads": threads,
        "tasks": results,
        "warmup": {"task": "copy", "steps": cfg["warmup_steps"], "final_loss": warm_losses[-1], "base_copy_accuracy": copy_acc},
        "base_dir": str(base_dir),
        "data_dir": str(data_dir),
        "adapters": {s: str(p) for s, p in adapters.items()},
        "model": {"parameters": n_params, **model_cfg, "quantization": info["quantization"]},
        "seed": seed,
        "settings": {k: v for k, v in cfg.items() if k not in ("model", "recipe_overrides")},
        "loss_png": str(png) if png else None,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    _say(f"done in {report['seconds']:.0f}s: {out / 'report.json'}, {png}")
    _say(f"try it: qtulu chat --model {_rel(base_dir)} --adapter {_rel(adapters[DEMO_SKILLS[0]])} "
         f"--adapter {_rel(adapters[DEMO_SKILLS[1]])}   (then /adapter {DEMO_SKILLS[1]}; the README has the tour)")
    _say("the paper's experiment on these skills (adapters, their merge, the table), one resumable command: "
         "qtulu study demo --out study_out")
    return report


def _setup_model(seed: int, cfg: dict[str, Any]):
    """The character tokenizer and the tiny LLaMA (fp32, SDPA), and the torch threads sized for it."""
    import torch

    from qtulu.model.threads import threads_for
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    tok = build_char_tokenizer()
    model_cfg = {**DEMO_MODEL, **cfg["model"]}
    model = build_tiny_llama(seed, torch.float32, vocab_size=len(tok), **model_cfg)
    model.set_attn_implementation("sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    threads = cfg["threads"] or threads_for(n_params)  # the demo sizes them even under OMP_NUM_THREADS
    torch.set_num_threads(threads)
    _say(f"tiny LLaMA: {n_params / 1e3:.0f}k parameters, {model_cfg['num_hidden_layers']} layers, "
         f"hidden {model_cfg['hidden_size']}; character tokenizer ({len(tok)} tokens); all built in-process; "
         f"{threads} torch thread{'s' if threads > 1 else ''}")
    return tok, model, model_cfg, threads


def _write_data(data_dir: Path, seed: int, cfg: dict[str, Any]):
    """The synthetic train / held-out splits of the copy task and the demo skills, also as JSONL files."""
    from qtulu.demo.synthetic import TASKS, make_examples, write_jsonl

    splits: dict[str, dict[str, list[dict]]] = {}
    for task in ("copy", *DEMO_SKILLS):
        splits[task] = {
            "train": make_examples(task, cfg["train_examples"], split="train", seed=seed),
            "test": make_examples(task, cfg["test_examples"], split="test", seed=seed),
        }
        for split, rows in splits[task].items():
            write_jsonl(rows, data_dir / f"{task}_{split}.jsonl")
    _say("synthetic datasets: " + ", ".join(
        f"{t} ({TASKS[t]['kind']}: {splits[t]['train'][0]['prompt']!r} -> {splits[t]['train'][0]['answer']!r})"
        for t in DEMO_SKILLS) + f"; {cfg['train_examples']} train / {cfg['test_examples']} held-out each")
    return splits, data_dir


def _train_adapters(base, tok, base_dir: Path, data_dir: Path, out: Path, cfg: dict[str, Any], phase, progress: bool):
    """One QLoRA adapter per skill through the `qtulu train` path; the base comes back unwrapped."""
    from qtulu.recipes import REPO_RECIPES_DIR, load_recipe
    from qtulu.train.run import train

    recipe_path = REPO_RECIPES_DIR / "demo.yaml"
    adapters: dict[str, Path] = {}
    curves: dict[str, list[dict]] = {}
    for skill in DEMO_SKILLS:
        overrides = [f"name={skill}", f"model.base={base_dir}", f"sources.skill.path={data_dir / f'{skill}_train.jsonl'}"]
        steps = cfg.get("adapter_steps") or SKILL_STEPS.get(skill)
        if steps:
            overrides.append(f"train.max_steps={steps}")
        overrides += list(cfg["recipe_overrides"])
        recipe = load_recipe(recipe_path, overrides)
        _say(f"training QLoRA adapter '{skill}' (r={recipe.lora.r}, {recipe.train.max_steps} steps) with qtulu.train.run.train")
        with phase(f"adapter:{skill}"):
            result = train(recipe, output_dir=out / "runs" / skill, model=base, tokenizer=tok, resume="never",
                           progress=progress)
        losses = [s["loss"] for s in result.steps if s["loss"] is not None]
        _say(f"adapter '{skill}' done in {phase.times[f'adapter:{skill}']['wall']:.0f}s, loss {losses[0]:.2f} -> "
             f"{losses[-1]:.3f}; saved to {result.adapter_dir}")
        adapters[skill] = result.adapter_dir
        curves[skill] = result.steps
        base = result.model.unload()  # the LoRA layers come off; the NF4 base is untouched
    return base, adapters, curves


def _evaluate(base, tok, info: dict, adapters: dict[str, Path], splits) -> tuple[dict[str, dict[str, float]], float]:
    """Both adapters on ONE loaded base, swapped with set_active (named by their runs): exact match
    per task and adapter, and the base's own on the copy task."""
    from qtulu.adapters.store import attach_adapters, set_active

    model = attach_adapters(base, [str(adapters[s]) for s in DEMO_SKILLS], base_info=info)
    model.eval()
    tasks = list(DEMO_SKILLS)
    results: dict[str, dict[str, float]] = {t: {} for t in tasks}
    for name in ["base", *DEMO_SKILLS]:
        set_active(model, name)
        for t in tasks:
            results[t][name] = exact_match(model, tok, splits[t]["test"])
    set_active(model, "base")
    return results, exact_match(model, tok, splits["copy"]["test"])


def _rel(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else absolute."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _print_table(results: dict[str, dict[str, float]], copy_acc: float | None) -> None:
    names = list(next(iter(results.values())).keys())
    head = f"{'held-out task':<16}" + "".join(f"{n:>12}" for n in names)
    print()
    print("exact match on held-out splits (greedy decoding); rows: task, columns: adapter on the one NF4 base")
    print(head)
    print("-" * len(head))
    for task, row in results.items():
        print(f"{task:<16}" + "".join(f"{row[n]:>12.2f}" for n in names))
    if copy_acc is not None:
        print(f"(warm-up check: the base echoes held-out 'copy' prompts with accuracy {copy_acc:.2f})")
    print()


def _plot(path: Path, warm: list[float], curves: dict[str, list[dict]]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    axes[0].plot(range(1, len(warm) + 1), warm, lw=1.2)
    axes[0].set_title("warm-up pretraining of the base (copy task, all weights)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    for skill, steps in curves.items():
        xs = [s["step"] for s in steps if s["loss"] is not None]
        ys = [s["loss"] for s in steps if s["loss"] is not None]
        axes[1].plot(xs, ys, lw=1.2, label=f"adapter '{skill}'")
    axes[1].set_title("QLoRA adapters on the NF4 base")
    axes[1].set_xlabel("optimizer step")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_yscale("log")
    # fixed margins: tight_layout measures every log-scale tick label (a second of the demo's CPU)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12, top=0.92, wspace=0.15)
    atomic_write(path, fig.savefig)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end demo on a CPU: tiny model, synthetic skills, one QLoRA adapter each, eval",
        description="Offline demo: tiny in-process LLaMA, synthetic skills, one QLoRA adapter per skill "
                    "trained with the `qtulu train` path, adapters swapped on one NF4 base, exact-match table.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (report.json, loss.png, adapters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that is not a demo output")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from qtulu.files import check_output

    check_output(args.out, kind="demo", overwrite=args.overwrite)  # its base/, data/, runs/ replace what is there
    run_demo(args.out, seed=args.seed, progress=not args.no_progress)
    return 0
