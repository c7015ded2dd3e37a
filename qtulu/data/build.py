"""Recipe -> tokenized, label-masked, packed dataset + manifest.

    from qtulu.recipes import load_recipe
    from qtulu.data.build import build_dataset, load_built
    built = build_dataset(load_recipe("tests/fixtures/shared_sources.yaml"), None)
    built.dataset[0].keys()   # input_ids, labels, position_ids, seq_lens
    built.manifest["packing"] # {"utilization": 0.99.., "sequences": ...}
    built.save("out/data"); load_built("out/data")

Steps: load each source's rows -> set aside its ``hold_out`` rows (`qtulu.data.holdout`; recorded in
``manifest["held_out"]``) -> convert (formats, under ``data.profile``) -> validate (chat) ->
sample ``count`` with the data seed -> tokenize in batches with offsets (labels on assistant replies
+ EOS) -> split long conversations (``messages`` sources with ``split_long``; ShareGPT splits in its
converter) -> truncate/drop over-long examples -> pack (BFD). Malformed rows are found here, before
any training step: ``on_bad_row: error`` stops at the first one with its location and reason,
``skip`` counts them by reason in ``manifest["dropped"]``. Rows the reference converter leaves out on
purpose are counted in ``manifest["filtered_by_source"]``; ``manifest["profile"]`` and ``["seed"]``
say how the rows were converted. Under ``profile: open_instruct`` an empty reply is kept and encoded
as open-instruct encodes it (nothing of that turn supervised; an example left with no label dropped
as ``empty_reply``, as its finetune.py drops it), counted in ``manifest["empty_replies_by_source"]``.
`build_notes` (printed by the CLI and ``qtulu train``) says what was dropped and why, and when a
``count`` above a source's rows repeated them (``manifest["sampling"]``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtulu.data.chat import (
    IGNORE_INDEX,
    encode_batch,
    message_token_counts,
    special_tokens_regex,
    split_conversation,
    tokenize_batch,
    validate_messages,
)
from qtulu.data.errors import BadRow, DataError
from qtulu.data.formats import Context, Filtered, check_options, convert, release_source
from qtulu.data.formats.superni import is_repository, task_files
from qtulu.data.sources import load_source
from qtulu.recipes import Recipe, SourceSpec

MANIFEST_VERSION = 1
TOKENIZE_BATCH = 1000


@dataclass
class BuiltData:
    """A built dataset: ``dataset`` (packed rows: input_ids, labels, position_ids, seq_lens) and its ``manifest``."""

    dataset: Any
    manifest: dict[str, Any]
    recipe: dict[str, Any] | None = None
    timings: dict[str, float] | None = None  # seconds per stage (load, tokenize, pack); not in the manifest
    example_lengths: Any = None  # tokens per example in source order, before packing (benchmarks)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``out_dir/{dataset/, manifest.json, recipe.json}`` atomically (staged beside, renamed last).

        An existing build in ``out_dir`` is replaced; a non-empty folder that is not a build is refused.
        """
        out = Path(out_dir).resolve()
        if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
            raise DataError(f"{out}: exists and is not a qtulu data build (no manifest.json); refusing to overwrite it")
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.stage-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the build is an ordinary folder
        try:
            self.dataset.save_to_disk(str(stage / "dataset"))
            _write_json(stage / "manifest.json", self.manifest)
            if self.recipe is not None:
                _write_json(stage / "recipe.json", self.recipe)
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
            stage.rename(out)
            if old is not None:
                shutil.rmtree(old)
        finally:
            if stage.exists():
                shutil.rmtree(stage)
        return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def load_built(path: str | os.PathLike) -> BuiltData:
    """Load what `BuiltData.save` wrote."""
    import datasets

    p = Path(path)
    if not (p / "manifest.json").exists():
        raise DataError(f"{p}: not a qtulu data build (no manifest.json)")
    manifest = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
    recipe = json.loads((p / "recipe.json").read_text(encoding="utf-8")) if (p / "recipe.json").exists() else None
    return BuiltData(datasets.load_from_disk(str(p / "dataset")), manifest, recipe)


# --------------------------------------------------------------------------------------------


class _Tally:
    """Counts of what was dropped / skipped, and the policy for bad rows."""

    def __init__(self, on_bad_row: str):
        self.on_bad_row = on_bad_row
        self.dropped: Counter = Counter()
        self.dropped_by_source: dict[str, Counter] = defaultdict(Counter)
        self.filtered_by_source: dict[str, Counter] = defaultdict(Counter)
        self.empty_replies: Counter = Counter()  # empty assistant turns kept (profile open_instruct)
        self.sampling: dict[str, dict] = {}  # source -> {rows, count, drawn} where `count` is set
        self.held_out: dict[str, dict] = {}  # source -> {hold_out, unit, held_out, of, sha256} where `hold_out` is set

    def bad(self, source: str, err: BadRow, where: str) -> None:
        if self.on_bad_row == "error":
            loc = err.where or where
            raise DataError(f"source {source!r}: {loc}: bad row ({err.reason}): {err.detail} "
                            "(set data.on_bad_row=skip to skip and count such rows)")
        self.drop(source, err.reason)

    def drop(self, source: str, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.dropped_by_source[source][reason] += n

    def filter(self, source: str, reason: str) -> None:
        self.filtered_by_source[source][reason] += 1


def resolve_tokenizer(recipe: Recipe, tokenizer=None):
    """``tokenizer`` itself, or loaded from a path/id string, or from ``data.tokenizer`` / ``model.base``."""
    from qtulu.data.tokenizer import check_fast, load_tokenizer

    if tokenizer is None:
        spec = recipe.data.tokenizer or recipe.model.base
        if spec is None:
            raise DataError(f"recipe {recipe.name!r}: no tokenizer (set data.tokenizer or model.base, or pass --tokenizer)")
        revision = None if recipe.data.tokenizer else recipe.model.revision
    elif isinstance(tokenizer, (str, os.PathLike)):
        spec, revision = tokenizer, None
    else:
        check_fast(tokenizer)
        return tokenizer
    try:
        return load_tokenizer(spec, revision=revision, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:  # not found / not fast / hub unreachable: name what was asked for
        raise DataError(f"recipe {recipe.name!r}: cannot load tokenizer {str(spec)!r}: {e}") from e


def _sample(n: int, count: int | float | None, rng: np.random.Generator) -> np.ndarray:
    """Indices for ``count`` of ``n`` examples: all (None), a fraction, or an int (the whole source
    repeated ``count // n`` times plus a sample without replacement when ``count > n``)."""
    if count is None or n == 0:
        return np.arange(n)
    if isinstance(count, float):
        k = max(1, int(round(count * n)))
        return np.sort(rng.choice(n, size=k, replace=False))
    reps, rest = divmod(count, n)
    return np.concatenate([np.tile(np.arange(n), reps), np.sort(rng.choice(n, size=rest, replace=False))]).astype(np.int64)


def resolved_source(spec: SourceSpec) -> SourceSpec:
    """``spec`` as it is read: a source with ``release`` reads the released mixture (format messages)."""
    return release_source(spec) if spec.release else spec


def collect_source(spec: SourceSpec, recipe: Recipe, tally: _Tally, special_re, *, sample: bool = True,
                   limit: int | None = None, tokenizer=None, max_seq_len: int | None = None):
    """Load, hold out (``hold_out``: its rows are left out here), convert and validate one source:
    ``([(where, messages)], inputs)``.

    ``tokenizer`` is needed by converters that count tokens (ShareGPT's ``split_long``).
    """
    spec, rows, inputs = _load_split(spec, tally)
    ctx = Context(profile=recipe.data.profile, seed=recipe.data.seed, tokenizer=tokenizer,
                  max_seq_len=int(max_seq_len or recipe.data.max_seq_len))
    good = _converted(spec, rows.train, ctx, tally, special_re, limit)
    if sample:
        rng = np.random.default_rng([recipe.data.seed, zlib.crc32(spec.name.encode())])
        picked = _sample(len(good), spec.count, rng)
        if spec.count is not None:
            tally.sampling[spec.name] = {"rows": len(good), "count": spec.count, "drawn": len(picked)}
        good = [good[i] for i in picked]
    tally.empty_replies[spec.name] += sum(1 for _, msgs in good for m in msgs if m["role"] == "assistant" and not m["content"])
    return good, inputs


def _load_split(spec: SourceSpec, tally: _Tally):
    """``(resolved spec, Split of its rows, inputs)``: the source read and its ``hold_out`` set aside
    (`qtulu.data.holdout.split_rows`, recorded in ``tally.held_out``)."""
    from qtulu.data.holdout import split_rows

    release = spec.release
    spec = resolved_source(spec)
    check_options(spec.format, spec.options, spec.name)
    files = None
    if spec.format == "superni" and spec.path and is_repository(spec.path):
        files = task_files(spec.path, spec.options)
    loaded = load_source(spec, files)
    if release:
        loaded.inputs["release"] = {"release": release, "dataset": spec.options["dataset"]}
    split = split_rows(spec.format, loaded.rows, spec.hold_out, spec.name)
    if spec.hold_out is not None:
        tally.held_out[spec.name] = split.info
    return spec, split, loaded.inputs


def _converted(spec: SourceSpec, rows, ctx: Context, tally: _Tally, special_re, limit: int | None = None):
    """``[(where, messages)]``: ``rows`` converted and validated; bad and filtered rows counted in ``tally``."""
    good: list[tuple[str, list[dict[str, str]]]] = []
    for where, item in convert(spec.format, rows, spec.options, ctx):
        if isinstance(item, BadRow):
            tally.bad(spec.name, item, where)
            continue
        if isinstance(item, Filtered):
            tally.filter(spec.name, item.reason)
            continue
        try:
            msgs = validate_messages(item, special_re, allow_empty_reply=ctx.profile == "open_instruct")
        except BadRow as e:
            tally.bad(spec.name, e, where)
        else:
            good.append((where, msgs))
        if limit is not None and len(good) >= limit:
            break
    return good


def held_out_rows(spec: SourceSpec):
    """``(resolved spec, held-out (where, row) pairs, info)``: the native rows of ``spec`` its
    ``hold_out`` sets aside (the rows the build leaves out), with what the manifest records of them."""
    if spec.hold_out is None:
        raise DataError(f"source {spec.name!r}: no hold_out set: there are no held-out rows to read")
    tally = _Tally("skip")
    resolved, split, _ = _load_split(spec, tally)
    return resolved, split.held, tally.held_out[spec.name]


def convert_rows(spec: SourceSpec, rows, tokenizer, *, profile: str = "open_instruct", seed: int = 42,
                 max_seq_len: int = 2048):
    """``([(where, messages)], {"dropped": {reason: n}, "filtered": {reason: n}})``: native ``rows`` of
    ``spec`` (already resolved) converted and validated as the build converts the rows it trains on
    (same converter, options, profile, seed and tokenizer checks); bad rows counted, not raised."""
    tally = _Tally("skip")
    ctx = Context(profile=profile, seed=seed, tokenizer=tokenizer, max_seq_len=int(max_seq_len))
    good = _converted(spec, rows, ctx, tally, special_tokens_regex(tokenizer) if tokenizer is not None else None)
    return good, {"dropped": dict(tally.dropped_by_source.get(spec.name, {})),
                  "filtered": dict(tally.filtered_by_source.get(spec.name, {}))}


def held_out_conversations(spec: SourceSpec, tokenizer, *, profile: str = "open_instruct", seed: int = 42,
                           max_seq_len: int = 2048):
    """The held-out rows of ``spec`` converted (`held_out_rows` then `convert_rows`): ``([(where,
    messages)], info)``, ``info`` = the manifest's record of the hold-out plus what was dropped or filtered."""
    resolved, rows, info = held_out_rows(spec)
    good, counts = convert_rows(resolved, rows, tokenizer, profile=profile, seed=seed, max_seq_len=max_seq_len)
    return good, {**info, **counts}


def _tokenizer_sha256(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, getattr(tokenizer, "chat_template", None)]).encode())
    return h.hexdigest()


def build_dataset(recipe: Recipe, tokenizer=None, *, max_seq_len: int | None = None, progress: bool = True,
                  say=None) -> BuiltData:
    """Build the packed training data of ``recipe`` (see the module docstring).

    ``tokenizer``: a fast tokenizer, a path/id for `load_tokenizer`, or None for the recipe's
    ``data.tokenizer`` (else ``model.base``). ``max_seq_len`` overrides ``data.max_seq_len``.
    ``say``: where `build_notes` go (rows repeated by sampling, rows dropped and why, ...); by
    default stderr when ``progress``, else nowhere.
    """
    # The build allocates millions of small acyclic objects (rows, messages, words) that the cyclic
    # garbage collector would rescan again and again (a quarter of the build's time on the shared
    # sources): it is paused during the build and restored after.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _build_dataset(recipe, tokenizer, max_seq_len=max_seq_len, progress=progress, say=say)
    finally:
        if was_enabled:
            gc.enable()


def _build_dataset(recipe: Recipe, tokenizer, *, max_seq_len: int | None, progress: bool, say=None) -> BuiltData:
    tok = resolve_tokenizer(recipe, tokenizer)
    L = int(max_seq_len or recipe.data.max_seq_len)
    tally = _Tally(recipe.data.on_bad_row)
    t0 = time.perf_counter()
    examples, inputs = _collect(recipe, tok, tally, L)
    t1 = time.perf_counter()
    kept = _tokenize(recipe, tok, examples, tally, L, progress)
    t2 = time.perf_counter()
    if not kept.ids:
        raise DataError(f"recipe {recipe.name!r}: no example left to train on (dropped: {dict(tally.dropped)})")
    packed, lens, flat_labels = _pack(kept, L)
    t3 = time.perf_counter()
    manifest = _manifest(recipe, tok, tally, kept, packed, lens, flat_labels, inputs, L)
    packed_tokens = _packed_tokens(packed)
    assert packed_tokens == manifest["tokens"], f"packing lost tokens: {packed_tokens} != {manifest['tokens']}"
    if say is None and progress:
        say = _say_stderr
    if say is not None:
        for line in build_notes(manifest):
            say(line)
    return BuiltData(packed, manifest, recipe.to_dict(), {"load": t1 - t0, "tokenize": t2 - t1, "pack": t3 - t2}, lens)


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _collect(recipe: Recipe, tok, tally: _Tally, L: int):
    """Stage 1: every source loaded, converted, validated and sampled: ``([(source index, where, messages)], inputs)``."""
    special_re = special_tokens_regex(tok)
    examples: list[tuple[int, str, list[dict[str, str]]]] = []
    inputs: dict[str, Any] = {}
    for si, spec in enumerate(recipe.sources):
        good, inputs[spec.name] = collect_source(spec, recipe, tally, special_re, tokenizer=tok, max_seq_len=L)
        examples.extend((si, w, m) for w, m in good)
    return examples, inputs


@dataclass
class _Kept:
    """What tokenization kept: ids and labels (int32 arrays) and the source index of each example."""

    ids: list
    labels: list
    src: list
    truncated: int = 0
    split_extra: int = 0


def _encode_or_name(batch, tok, chat_format: str, tally: _Tally, names: list[str], word_cache: dict) -> list:
    """``[(ids, labels) or None]`` for ``batch``; a template mismatch in the batch is redone one
    example at a time so that the bad row is named (None for it)."""
    try:
        return encode_batch([m for _, _, m in batch], tok, chat_format, word_cache=word_cache)
    except BadRow:
        pass
    encoded = []
    for si, where, m in batch:
        try:
            encoded.append(encode_batch([m], tok, chat_format)[0])
        except BadRow as e:
            tally.bad(names[si], e, where)
            encoded.append(None)
    return encoded


def _tokenize(recipe: Recipe, tok, examples: list, tally: _Tally, L: int, progress: bool) -> _Kept:
    """Stage 2: tokenize in batches, split long ``messages`` conversations, truncate or drop over-long
    examples, drop the ones with nothing supervised."""
    from tqdm.auto import tqdm

    cfg = recipe.data
    names = [s.name for s in recipe.sources]
    # qtulu's own splitting of long conversations, for `messages` sources (ShareGPT splits as
    # open-instruct did, in its converter, before any of this)
    split_long = [bool(s.options.get("split_long")) and resolved_source(s).format == "messages" and not s.release
                  for s in recipe.sources]
    kept = _Kept([], [], [])
    bar = tqdm(total=len(examples), desc=f"tokenize {recipe.name}", unit="ex", disable=not progress)
    word_cache: dict = {}  # distinct words already tokenized, across batches (see chat.encode_batch)
    queue = examples
    while queue:
        again: list[tuple[int, str, list[dict[str, str]]]] = []  # chunks of split conversations
        for b in range(0, len(queue), TOKENIZE_BATCH):
            batch = queue[b : b + TOKENIZE_BATCH]
            encoded = _encode_or_name(batch, tok, cfg.chat_format, tally, names, word_cache)
            for (si, where, msgs), enc in zip(batch, encoded):
                if enc is None:
                    continue
                ids, labels = enc
                if len(ids) > L and split_long[si] and queue is examples:
                    chunks = split_conversation(msgs, message_token_counts(msgs, tok, cfg.chat_format), L - 1)
                    if len(chunks) > 1:
                        kept.split_extra += len(chunks) - 1
                        again.extend((si, where, c) for c in chunks)
                        continue
                _keep(kept, tally, names[si], si, msgs, ids, labels, L, cfg.on_overlong)
            bar.update(len(batch) if queue is examples else 0)
        queue = again
    bar.close()
    return kept


def _keep(kept: _Kept, tally: _Tally, name: str, si: int, msgs, ids, labels, L: int, on_overlong: str) -> None:
    """Keep one encoded example (truncated to ``L`` if asked), or count why it is dropped."""
    cut = len(ids) > L
    if cut:
        if on_overlong == "drop":
            tally.drop(name, "overlong")
            return
        ids, labels = ids[:L], labels[:L]
    if not (labels != IGNORE_INDEX).any():
        # open-instruct's finetune.py drops such examples too (`labels != -100` filter); an example
        # whose replies are all empty is one of them (see chat.render_tulu_with_spans)
        empty = all(not m["content"] for m in msgs if m["role"] == "assistant")
        tally.drop(name, "empty_reply" if empty else "no_supervised_tokens")
        return
    kept.truncated += cut
    kept.ids.append(ids)
    kept.labels.append(labels)
    kept.src.append(si)


def _pack(kept: _Kept, L: int):
    """Stage 3: one Arrow table of the examples, packed (BFD): ``(packed, lens (N,), flat labels)``."""
    import datasets
    import pyarrow as pa

    from qtulu.data.packing import pack_examples

    lens = np.asarray([len(x) for x in kept.ids], dtype=np.int64)  # (N,)
    flat_ids = np.concatenate(kept.ids)  # (total,)
    flat_labels = np.concatenate(kept.labels)  # (total,)
    # 32-bit list offsets up to 2^31 tokens, 64-bit beyond (TRL packs both)
    big = lens.sum() >= 2**31
    list_cls, off_type = (pa.LargeListArray, pa.int64()) if big else (pa.ListArray, pa.int32())
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]), type=off_type)
    table = pa.table({
        "input_ids": list_cls.from_arrays(offsets, pa.array(flat_ids)),
        "labels": list_cls.from_arrays(offsets, pa.array(flat_labels)),
    })
    return pack_examples(datasets.Dataset(table), L), lens, flat_labels


def _packed_tokens(packed) -> int:
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute)

    return pa.compute.sum(pa.compute.list_flatten(packed.with_format("arrow")["seq_lens"])).as_py()


def _manifest(recipe: Recipe, tok, tally: _Tally, kept: _Kept, packed, lens, flat_labels, inputs, L: int) -> dict:
    """Stage 4: the manifest (what was built, from what, and what was left out and why)."""
    cfg = recipe.data
    names = [s.name for s in recipe.sources]
    n_tokens = int(lens.sum())
    per_source = Counter(names[s] for s in kept.src)
    return {
        "format_version": MANIFEST_VERSION,
        "recipe": recipe.name,
        "recipe_sha256": hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest(),
        "examples": len(kept.ids),
        "tokens": n_tokens,
        "supervised_tokens": int((flat_labels != IGNORE_INDEX).sum()),
        "dropped": dict(sorted(tally.dropped.items())),
        "dropped_by_source": {k: dict(sorted(v.items())) for k, v in tally.dropped_by_source.items()},
        "filtered_by_source": {k: dict(sorted(v.items())) for k, v in tally.filtered_by_source.items()},
        "empty_replies_by_source": dict(tally.empty_replies),
        "sampling": tally.sampling,
        "held_out": tally.held_out,
        "truncated": kept.truncated,
        "split_conversations_extra_chunks": kept.split_extra,
        "sources": {n: per_source.get(n, 0) for n in names},
        "packing": {
            "strategy": "bfd",
            "max_seq_len": L,
            "sequences": len(packed),
            "utilization": (n_tokens / (len(packed) * L)) if len(packed) else 0.0,
        },
        "max_example_len": int(lens.max()) if len(lens) else 0,
        "chat_format": cfg.chat_format,
        "profile": cfg.profile,
        "seed": cfg.seed,
        "tokenizer": {
            "name_or_path": getattr(tok, "name_or_path", None),
            "vocab_size": len(tok),
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "sha256": _tokenizer_sha256(tok),
        },
        "inputs": inputs,
    }


def build_notes(manifest: dict) -> list[str]:
    """Console lines for what a build did that its row count does not say: sources sampled with
    repetition (``count`` above the rows there are), rows dropped (by reason, per source), empty
    replies kept, examples truncated."""
    notes = []
    for name, s in (manifest.get("sampling") or {}).items():
        if s["drawn"] > s["rows"]:
            reps, rest = divmod(s["drawn"], s["rows"])
            notes.append(f"data: source {name!r}: count {s['count']} > its {s['rows']} rows: every row repeated "
                         f"{reps}x" + (f" plus {rest} drawn again" if rest else "") + f" ({s['drawn']} examples)")
    for name, reasons in (manifest.get("dropped_by_source") or {}).items():
        if reasons:
            what = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
            notes.append(f"data: source {name!r}: dropped {sum(reasons.values())} example(s): {what}")
    for name, n in (manifest.get("empty_replies_by_source") or {}).items():
        if n:
            notes.append(f"data: source {name!r}: {n} empty repl{'y' if n == 1 else 'ies'}, encoded as open-instruct "
                         "encodes them: the turn trains nothing, an example with no other reply is dropped as "
                         "empty_reply (docs/open_instruct_differences.md)")
    for name, h in (manifest.get("held_out") or {}).items():
        notes.append(f"data: source {name!r}: {h['held_out']} of {h['of']} {h['unit']} held out (hold_out={h['hold_out']}; "
                     "never trained on, scored by the reply_loss eval task)")
    if manifest.get("truncated"):
        notes.append(f"data: {manifest['truncated']} example(s) truncated to {manifest['packing']['max_seq_len']} tokens")
    notes.append(f"data: {manifest['examples']} examples, {manifest['tokens']} tokens "
                 f"({manifest['supervised_tokens']} supervised) in {manifest['packing']['sequences']} packed rows")
    return notes


def preview_examples(recipe: Recipe, tokenizer=None, *, n: int = 3) -> list[dict[str, Any]]:
    """The first ``n`` valid examples of each source, tokenized: ``[{"source", "where", "input_ids", "labels"}]``.

    Bad rows are skipped (counted in the last item's ``"skipped"``) whatever the policy: a preview
    should show data, the build is where policy applies.
    """
    tok = resolve_tokenizer(recipe, tokenizer)
    special_re = special_tokens_regex(tok)
    tally = _Tally("skip")
    out = []
    for spec in recipe.sources:
        good, _ = collect_source(spec, recipe, tally, special_re, sample=False, limit=n, tokenizer=tok)
        for (where, msgs), (ids, labels) in zip(good, tokenize_batch([m for _, m in good], tok, recipe.data.chat_format)):
            out.append({"source": spec.name, "where": where, "input_ids": ids, "labels": labels,
                        "overlong": len(ids) > recipe.data.max_seq_len})
    if out:
        out[-1]["skipped"] = dict(tally.dropped)
    return out
