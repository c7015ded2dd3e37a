"""STUDY.yaml: the schema of a study (typed dataclasses, checked like recipes by `qtulu.schema`).

A study names one base, the recipes to train on it (one adapter each), the tasks to evaluate the
base and every adapter on, the evaluation settings and, optionally, a merge search. An unknown key
or a value of the wrong type raises `StudyError` naming the file and the dotted key. Every field
carries a one-line meaning (the comment on its line or just above it; a test keeps them there).

Strings may contain ``${out}``: the study's output directory (``qtulu study FILE --out DIR``), so a
study can read what it writes (the demo study's synthetic data, ``${out}/data``). Relative paths
are relative to the study file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from qtulu.errors import QtuluError


class StudyError(QtuluError, ValueError):
    """A study that cannot run as written: the message names the file and the dotted key."""


@dataclass(frozen=True)
class DemoBaseSpec:
    """The demo's tiny base built in-process (nothing downloaded): a small LLaMA and a character
    tokenizer, warmed up (all weights) on the synthetic ``copy`` task, as `qtulu demo` builds it."""

    seed: int = 0  # seed of the weights' initialisation, the warm-up examples and their order
    warmup_steps: int = 120  # full-weight warm-up steps on the copy task (the chat format, echoing text)
    warmup_batch: int = 32  # examples per warm-up step
    warmup_lr: float = 2e-3  # warm-up learning rate (AdamW, beta2 0.95, constant after a 10% warm-up)
    warmup_examples: int = 1000  # copy examples drawn for the warm-up (train split)
    hidden_size: int = 64  # model width
    intermediate_size: int = 176  # MLP width
    num_hidden_layers: int = 2  # transformer layers
    num_attention_heads: int = 4  # attention heads
    num_key_value_heads: int = 4  # key/value heads (fewer than the heads: grouped-query attention)
    initializer_range: float = 0.06  # std of the weights' initialisation (0.06 lets the copy skill appear in ~80 steps)


@dataclass(frozen=True)
class BaseSpec:
    """The one base every adapter is trained on and every row is evaluated on (loaded once)."""

    path: str | None = None  # a local safetensors model directory or a hub id (null: set `demo`)
    revision: str | None = None  # hub revision (branch, tag or commit) of `path`
    demo: DemoBaseSpec | None = None  # build the demo's tiny base in-process into OUT/base instead of `path`
    # every recipe's model.* settings are these (one loaded base serves all of them)
    quantize: Literal["nf4"] | None = "nf4"  # nf4: QLoRA on a 4-bit base; null: plain LoRA on a compute_dtype base
    double_quant: bool = True  # quantize the NF4 block scales too (QLoRA's double quantization)
    blocksize: int = 64  # NF4 block size (weights per absmax scale)
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # dtype of the matmuls and unquantized weights
    attn_implementation: str = "qtulu_varlen"  # attention kernel for training and evaluation
    trust_remote_code: bool = False  # run the checkpoint's own Python code (off unless you trust it)


@dataclass(frozen=True)
class SyntheticSpec:
    """The demo's synthetic skills (`qtulu.demo.synthetic`), written to ``OUT/data/SKILL_{train,test}.jsonl``."""

    skills: list[str] = field(default_factory=lambda: ["upper", "successor"])  # skills to write (copy, upper, successor)
    train_examples: int = 1000  # training examples per skill
    test_examples: int = 100  # held-out examples per skill (what the synthetic_* tasks score)
    seed: int = 0  # seed of the examples


@dataclass(frozen=True)
class StudyRecipe:
    """One row of the table: a recipe trained into one adapter on the study's base."""

    recipe: str  # recipe name (recipes/NAME.yaml) or YAML path (relative to the study file)
    name: str | None = None  # the row's name: run directory OUT/runs/NAME and adapter name (default: the recipe's name)
    preset: str | None = None  # a recipe preset applied before the overrides (default: the study's `preset`)
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe keys to override, {dotted key: value} (after the study's)


@dataclass(frozen=True)
class JudgeSpec:
    """An OpenAI-compatible endpoint judging AlpacaEval and TruthfulQA generations."""

    url: str  # API base, e.g. http://localhost:8000/v1
    model: str  # model name at the endpoint
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the API key (never written anywhere)


@dataclass(frozen=True)
class StudyTask:
    """One column of the table: an eval task with its options."""

    name: str  # task variant (`qtulu eval --list-tasks`)
    # the column's label in the table, records and merge search (default: the task's name); give
    # each column of one task its own, e.g. reply_loss per source: column: dolly_loss
    column: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # task options, as `qtulu eval -o TASK.KEY=VALUE`
    data_dir: str | None = None  # this task's eval data root (default: eval.data_dir)
    judge: JudgeSpec | None = None  # this task's judge endpoint (default: eval.judge)


@dataclass(frozen=True)
class EvalSpec:
    """How every (row, task) cell is evaluated (the settings of `qtulu eval`)."""

    data_dir: str | None = None  # eval data root of every task (as `qtulu eval --data-dir`)
    include_base: bool = True  # a row for the base itself (adapters disabled)
    profile: Literal["open_instruct", "corrected"] = "open_instruct"  # open_instruct: the paper's evaluation; corrected: its mistakes fixed
    batch_size: int = 8  # prompts per generation batch
    limit: int | None = None  # examples per subject/subtask/language (null: all; a limited run is not comparable)
    quick: bool = False  # smoke run: a few subtasks, short generations, one sample (as `qtulu eval --quick`)
    chat_format: Literal["tulu", "tokenizer"] | None = "tulu"  # prompt format of the adapters' rows
    base_chat_format: Literal["tulu", "tokenizer"] | None = None  # prompt format of the base row (null: plain, as the paper)
    max_length: int | None = None  # longest prompt + generation in tokens (null: the model's)
    judge: JudgeSpec | None = None  # judge endpoint of every task that needs one (alpaca_eval, truthfulqa_gen)
    toxigen_classifier: str | None = None  # toxicity classifier path or hub id (toxigen)
    allow_code_execution: bool = False  # run model-written code in the sandbox (codex_humaneval)
    unsafe_no_isolation: bool = False  # where the sandbox cannot isolate code (not root), run it anyway
    workers: int | None = None  # sandbox workers (null: the CPU count)
    cache_dir: str | None = None  # also keep every eval cell in this content-addressed folder (shared by studies)


@dataclass(frozen=True)
class MergeSearchSpec:
    """Let the suite choose a merge of the adapters (`qtulu eval merge-search`); the winner is a row."""

    name: str = "merge"  # the merged adapter's row name
    adapters: list[str] | None = None  # rows (recipe names) to merge (null: every recipe)
    tasks: list[str] | None = None  # tasks that choose the merge (null: every task of the study)
    methods: list[str] = field(default_factory=lambda: ["linear", "ties", "dare_linear", "dare_ties", "cat"])  # merge methods tried
    weights: list[list[float]] | None = None  # weight vectors tried, one weight per adapter (null: a small grid per method)
    densities: list[float] = field(default_factory=lambda: [0.5])  # densities tried by ties and dare_*
    limit: int | None = 20  # examples per task (subject, subtask) scoring each candidate: a slice, not the whole task
    seed: int = 0  # seed of DARE's random pruning


@dataclass(frozen=True)
class Study:
    """A whole study: one base, a recipe per row, a task per column."""

    name: str  # the study's name (the default output directory studies/NAME)
    base: BaseSpec  # the one base model
    recipes: list[str | StudyRecipe]  # the rows: recipe names/paths, or mappings with a name, preset and overrides
    tasks: list[str | StudyTask]  # the columns: task names, or mappings with options and a data folder
    description: str = ""  # one line saying what the study asks
    synthetic: SyntheticSpec | None = None  # write the demo's synthetic skills to ${out}/data first
    preset: str | None = None  # a recipe preset applied to every recipe (e.g. smoke)
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe keys overridden in every recipe, {dotted key: value}
    eval: EvalSpec = field(default_factory=EvalSpec)  # evaluation settings
    # tasks the table's average is over (null: every task); the paper averages its capability columns
    average: list[str] | None = None
    merge_search: MergeSearchSpec | None = None  # optional: a merge of the adapters chosen by the suite, as one more row
