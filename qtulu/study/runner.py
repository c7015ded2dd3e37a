"""Run a study: only the cells that are missing, the base loaded once, adapters swapped on it.

Order: checks that need no model (`preflight`: the study file, every recipe, every task and its
options, eval data, sources, judge/classifier/code-execution settings, the base's files), then the
demo base if the study builds one, then each missing recipe's packed data (tokenizer only, so a
bad row stops the study before any model load), then, with the base loaded once, each missing
adapter (`qtulu.train.run.train` on the loaded base), each missing (row, task) eval cell
(`qtulu.evals.runner.evaluate` with the row's adapter active on that base), the merge search and
its row, and last the table (`qtulu.study.report`).

A finished study re-run loads nothing (not even torch): every key is computed from files.
Ctrl-C stops with one line saying how many cells are complete; the same command resumes.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

from qtulu.errors import QtuluError
from qtulu.study.load import BASE_ROW, Column, LoadedStudy, Row, default_out, describe, load_study, to_json
from qtulu.study.plan import Plan
from qtulu.study.schema import StudyError


def say(msg: str) -> None:
    print(f"[qtulu study] {msg}", flush=True)


def run_study(path, out_dir=None, *, progress: bool = True, plan_only: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) the study at ``path`` in ``out_dir`` (default ``studies/NAME``); returns the
    results (also ``OUT/results.json``). ``plan_only``: print which cells are complete and stop."""
    from qtulu.train.runlock import run_lock

    out = Path(out_dir) if out_dir is not None else default_out(path)
    study = load_study(path, out)
    _check_out(study, overwrite)
    run = StudyRun(study, progress=progress)
    run.preflight(inside_out=False)  # before the output folder is even created
    if plan_only:  # a look, not a run: no lock, no synthetic data, no memo; nothing is written
        return run.show_plan()
    with run_lock(study.out, what="qtulu study", hint="choose another --out"):
        run.prepare()
        return run.run()


def _check_out(study: LoadedStudy, overwrite: bool) -> None:
    """The study's folder is none of the files it reads (study file, recipes, a base or eval data
    outside it), and is new, empty or an earlier study (`qtulu.files.check_output`)."""
    from qtulu.files import check_output

    inputs = [("study file", study.file), *[(f"recipe of row {r.name}", getattr(r.recipe, "path", None)) for r in study.rows]]
    if study.base.demo is None:
        inputs.append(("base model", study.base_path))
    check_output(study.out, kind="study", inputs=inputs, overwrite=overwrite)


@contextlib.contextmanager
def _library_bars(progress: bool):
    """Without progress bars, also without the bars of datasets (saving the packed data) and of
    transformers (writing the demo base's shards); both are put back as they were."""
    if progress:
        yield
        return
    import datasets
    import transformers

    ds_off = datasets.is_progress_bar_enabled() is False
    tf_off = not transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if not ds_off:
            datasets.enable_progress_bars()
        if not tf_off:
            transformers.utils.logging.enable_progress_bar()


class StudyRun:
    """One invocation of a study on its output folder (holding its lock)."""

    def __init__(self, study: LoadedStudy, *, progress: bool = True):
        self.study = study
        self.plan = Plan(study)
        self.records = self.plan.records
        self.progress = progress
        self.model = None  # the base (a PeftModel once adapters are attached)
        self.tok = None
        self.info: dict | None = None
        self.attached: set[str] = set()
        self.tokenizers: dict[str, Any] = {}
        self.judges: dict[str, Any] = {}  # task -> its Judge (or None)
        self.complete = 0
        self.total = 0
        self.threads: int | None = None

    # ---- checks before any model

    def preflight(self, *, inside_out: bool) -> None:
        """Everything checkable without a model: requirements, eval data, sources, the base's files.

        Run twice: with ``inside_out=False`` before the output folder is created or locked (what lies
        outside it), then with ``inside_out=True`` once the study's synthetic data is written (what
        lies inside it, e.g. ``${out}/data``).
        """
        from qtulu.data.sources import local_files
        from qtulu.evals.judge import Judge
        from qtulu.evals.runner import check_requirements, resolve_task

        s, ev = self.study, self.study.eval

        def mine(path) -> bool:  # checked in this pass
            p = Path(path).resolve()
            return (p == s.out or s.out in p.parents) == inside_out

        if not inside_out:
            for c in s.columns:
                j = c.judge
                self.judges[c.name] = None if j is None else Judge(j.url, j.model, api_key_env=j.api_key_env)
                try:
                    check_requirements([c.task], judge=self.judges[c.name], classifier=ev.toxigen_classifier,
                                       allow_code_execution=ev.allow_code_execution,
                                       unsafe_no_isolation=ev.unsafe_no_isolation)
                except QtuluError as e:
                    raise StudyError(f"{s.file}: {c.where} ({c.name}): {e}") from None
            if s.base.demo is None:
                p = Path(s.base_path)
                if p.is_absolute() and not p.is_dir() and not (p.is_file() and p.suffix.lower() == ".gguf"):
                    raise StudyError(f"{s.file}: base.path: {p}: not found (no such directory)")
                if p.is_dir() and not ((p / "config.json").is_file() and list(p.glob("*.safetensors"))):
                    raise StudyError(f"{s.file}: base.path: {p}: not a model directory (config.json + *.safetensors)")
        for c in s.columns:
            if not mine(c.data_dir):
                continue
            if not c.data_dir.is_dir():
                raise StudyError(f"{s.file}: {c.where} ({c.name}): eval data folder {c.data_dir} not found")
            task = resolve_task(c.task, c.options, ev.profile)
            try:
                task.module.load(c.data_dir, limit=1, **task.opts)  # TaskDataError names the missing file
            except (QtuluError, OSError, ValueError) as e:
                raise StudyError(f"{s.file}: {c.where} ({c.name}): {e}") from None
        for r in s.rows:
            for src in r.recipe.sources:
                if src.path and mine(src.path.split("*")[0]):
                    try:
                        local_files(src.path, src.name)
                    except (QtuluError, OSError) as e:
                        raise StudyError(f"{s.file}: {r.where} ({r.name}): {e}") from None

    def prepare(self) -> None:
        """Inside the locked output folder: the synthetic data, then the checks of what lies there."""
        from qtulu.files import atomic_write_text

        s = self.study
        if s.synthetic is not None:
            from qtulu.study.demo_base import write_synthetic

            write_synthetic(s.synthetic, s.out / "data")
        self.preflight(inside_out=True)
        atomic_write_text(s.out / "study.json", to_json(s))

    def show_plan(self) -> dict:
        """Which cells are complete, read from the files only (`--plan`: writes nothing, takes no lock).
        What lies inside the output folder is checked where it exists; the study's synthetic data is
        written by its first run, so on a fresh folder its cells are all "to run"."""
        s = self.study
        if s.synthetic is None or (s.out / "data").is_dir():
            self.preflight(inside_out=True)
        status = self.plan.status()
        say(describe(self.study))
        for cell, ok in status.items():
            print(f"  {'complete' if ok else 'to run  '}  {cell}")
        n = sum(status.values())
        say(f"{n} of {len(status)} cells complete in {self.study.out}")
        return {"cells": status}

    # ---- the run

    def run(self) -> dict:
        from qtulu.study.report import text_table, write_results

        s = self.study
        t0 = time.perf_counter()
        status = self.plan.status()
        self.total, self.complete = len(status), sum(status.values())
        missing = [c for c, ok in status.items() if not ok]
        self.records.recover()
        self.records.log("start", total=self.total, complete=self.complete)
        say(describe(s))
        if missing:
            say(f"{self.complete} of {self.total} cells complete in {s.out}; {len(missing)} to run")
        else:
            say(f"all {self.total} cells complete in {s.out}: nothing to train or evaluate")
        try:
            if missing:
                with _library_bars(self.progress):
                    self._run_missing(status)
        except KeyboardInterrupt:
            self.records.log("interrupted", complete=self.complete)
            raise KeyboardInterrupt(f"{self.complete} of {self.total} cells complete in {s.out}; "
                                    "run the same command again to resume") from None
        finally:
            self.plan.hasher.save()
            self._restore_threads()
        results = write_results(self.plan, progress=self.progress)
        self.plan.hasher.save()
        secs = time.perf_counter() - t0
        self.records.log("end", ran=len(missing), seconds=round(secs, 2))
        print()
        print(text_table(results))
        print()
        say(f"{'ran ' + str(len(missing)) + ' cell(s)' if missing else 'nothing to run'} in {secs:.1f}s; "
            f"{s.out / 'results.json'}, {s.out / 'results.md'}, {s.out / 'heatmap.png'}")
        return results

    def _run_missing(self, status: dict[str, bool]) -> None:
        from tqdm.auto import tqdm

        s, plan = self.study, self.plan
        self.bar = tqdm(total=self.total, initial=self.complete, desc="study", unit="cell", disable=not self.progress)
        try:
            if not status.get("base", True):
                self._cell("base", self._build_base)
            elif s.base.demo is None and plan.base_dir() is None:  # a hub id not in the local cache yet
                from qtulu.model.load import resolve_checkpoint

                say(f"downloading the base {s.base_path} (config, safetensors, tokenizer files)")
                resolve_checkpoint(s.base_path, s.base.revision)
            # each missing cell is checked again just before it runs: what an earlier cell of this run
            # made may complete it (a retrained adapter identical to the one an eval cell scored)
            for r in s.rows:
                self._step(status, f"data/{r.name}", lambda r=r: plan.train_complete(r) or plan.data_complete(r),
                           lambda r=r: self._build_data(r))
            for r in s.rows:
                self._step(status, f"train/{r.name}", lambda r=r: plan.train_complete(r), lambda r=r: self._train(r))
            for label in [lab for lab in s.labels if not (s.merge and lab == s.merge.name)]:
                for c in s.columns:
                    self._step(status, f"eval/{label}/{c.name}",
                               lambda label=label, c=c: plan.eval_complete(label, c) is not None,
                               lambda label=label, c=c: self._eval(label, c))
            if s.merge:
                name = s.merge.name
                self._step(status, "merge", plan.merge_complete, self._merge)
                for c in s.columns:
                    self._step(status, f"eval/{name}/{c.name}", lambda c=c: plan.eval_complete(name, c) is not None,
                               lambda c=c: self._eval(name, c))
        finally:
            self.bar.close()

    def _step(self, status: dict[str, bool], cell: str, complete_now, fn) -> None:
        if status[cell]:
            return
        if complete_now():
            self.records.log("reused", cell)
            self._done(cell)
        else:
            self._cell(cell, fn)

    def _cell(self, cell: str, fn) -> None:
        self.bar.set_description(f"study · {cell}")
        self.records.log("run", cell)
        t = time.perf_counter()
        try:
            fn()
        except QtuluError as e:  # which cell failed, and what is kept (the same command resumes after a fix)
            self.records.log("failed", cell, error=str(e))
            raise StudyError(f"cell {cell}: {e} ({self.complete} of {self.total} cells complete in "
                             f"{self.study.out})") from e
        rec = self.records.read(cell) or {}
        self.records.log("done", cell, key=rec.get("key"), seconds=round(time.perf_counter() - t, 2))
        self._done(cell)

    def _done(self, cell: str) -> None:
        self.complete += 1
        self.bar.update()

    # ---- cells

    def _build_base(self) -> None:
        from qtulu.study.demo_base import build_demo_base

        t = time.perf_counter()
        out = self.study.out / "base"
        result = build_demo_base(self.study.base.demo, out, progress=self.progress, say=say)
        self.plan.forget_base()
        result["base_sha256"] = self.plan._base_files_sha(out)
        self.records.write("base", self.plan.base_key(), {"demo": self.study.raw.get("base", {}).get("demo")}, result,
                           time.perf_counter() - t)

    def _tokenizer(self, row: Row):
        from qtulu.data.build import resolve_tokenizer

        spec = row.recipe.data.tokenizer or row.recipe.model.base
        if spec not in self.tokenizers:
            self.tokenizers[spec] = resolve_tokenizer(row.recipe)
        return self.tokenizers[spec]

    def _build_data(self, row: Row) -> None:
        from qtulu.data.build import build_dataset

        t = time.perf_counter()
        built = build_dataset(row.recipe, self._tokenizer(row), progress=self.progress)
        if len(built.dataset) == 0:
            raise StudyError(f"{self.study.file}: {row.where} ({row.name}): the packed training data is empty")
        built.save(self.plan.run_dir(row) / "data")
        counts = {k: v for k, v in built.manifest.items() if isinstance(v, (int, float, str))}
        self.records.write(f"data/{row.name}", self.plan.data_key(row), {"recipe": row.recipe.name},
                           {"rows": len(built.dataset), **counts}, time.perf_counter() - t)

    def _load_base(self) -> None:
        if self.model is not None:
            return
        import torch

        from qtulu.model.load import base_info, load_base
        from qtulu.preflight import check_base_dir
        from qtulu.model.threads import fit_threads

        b = self.study.base
        check_base_dir(self.study.base_path, b.revision, "base.path")
        say(f"loading the base {self.study.base_path} ({'NF4' if b.quantize else b.compute_dtype}), once")
        self.threads = torch.get_num_threads()
        self.model, self.tok = load_base(self.study.base_path, quantize=b.quantize, compute_dtype=b.compute_dtype,
                                         double_quant=b.double_quant, blocksize=b.blocksize, revision=b.revision,
                                         trust_remote_code=b.trust_remote_code,
                                         attn_implementation=b.attn_implementation)
        self.info = base_info(self.model)
        fit_threads(self.model)  # one intra-op thread for a small model: more only oversubscribe the cores

    def _restore_threads(self) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)

    def _train(self, row: Row) -> None:
        import json

        from qtulu.data.build import load_built
        from qtulu.study.store import write_json_atomic
        from qtulu.train.run import train

        if not self.plan.data_complete(row):  # its data was removed since the run began
            self._build_data(row)
        self._load_base()
        if self.attached:
            raise RuntimeError("internal: training after adapters were attached")
        t = time.perf_counter()
        key = self.plan.train_key(row)
        run_dir = self.plan.run_dir(row)
        pending = run_dir / ".study-pending.json"
        try:
            same = json.loads(pending.read_text()).get("key") == key
        except (OSError, ValueError):
            same = False
        write_json_atomic(pending, {"key": key})
        # the same cell interrupted: resume from its newest checkpoint; another recipe: start over
        # (train sets an earlier run's checkpoints aside, never deletes them)
        result = train(row.recipe, output_dir=run_dir, model=self.model, tokenizer=self.tok,
                       data=load_built(run_dir / "data"), resume="auto" if same else "never",
                       progress=self.progress, name=row.name)
        self.model = result.model.unload()  # the LoRA layers come off; the base is untouched
        losses = [x["loss"] for x in result.steps if x.get("loss") is not None]
        from qtulu import __version__ as qtulu_version
        from qtulu.study.plan import _versions

        self.records.write(f"train/{row.name}", key, {"recipe": row.recipe.name, "versions": {
            "qtulu": qtulu_version, **_versions("torch", "transformers", "peft", "trl")}},
            {"adapter_sha256": self.plan.adapter_sha(row.name), "global_step": result.global_step,
             "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
             "skipped_steps": result.skipped_steps}, time.perf_counter() - t)
        pending.unlink(missing_ok=True)
        # the packed rows are not needed any more (its manifest is in the adapter's qtulu.json): on the
        # paper's mixtures they are gigabytes each
        shutil.rmtree(run_dir / "data", ignore_errors=True)

    def _attach(self, labels: list[str]) -> None:
        from qtulu.adapters.store import attach_adapters

        self._load_base()
        new = [lab for lab in labels if lab != BASE_ROW and lab not in self.attached]
        if new:
            self.model = attach_adapters(self.model, [(lab, str(self.plan.adapter_dir(lab))) for lab in new],
                                         base_info=self.info)
            self.model.eval()
            self.attached.update(new)

    def _eval(self, label: str, col: Column) -> None:
        from qtulu.evals.runner import evaluate

        s, ev = self.study, self.study.eval
        t = time.perf_counter()
        key = self.plan.eval_cell_key(label, col)
        self._attach([label])
        res = evaluate(self.model, self.tok, [col.task], data_dir=col.data_dir, out_dir=self.plan.eval_dir(),
                       adapters=[label], batch_size=ev.batch_size, limit=s.limit, chat_format=ev.chat_format,
                       base_chat_format=ev.base_chat_format, judge=self.judges[col.name],
                       classifier=ev.toxigen_classifier,
                       allow_code_execution=ev.allow_code_execution, workers=ev.workers,
                       unsafe_no_isolation=ev.unsafe_no_isolation, task_options={col.name: col.options},
                       columns={col.name: col.task},
                       max_length=ev.max_length, progress=self.progress, report=False, profile=ev.profile,
                       resume=True, cache_dir=ev.cache_dir)
        m = res["results"][label][col.name]
        column = {"column": col.name} if col.name != col.task else {}
        self.records.write(f"eval/{label}/{col.name}", key, {"row": label, "task": col.task, **column},
                           {"eval_key": m["cell"]["key"], "score": m.get("score"), "n": m.get("n"),
                            "metric": m.get("metric"), "lower_is_better": bool(m.get("lower_is_better"))},
                           time.perf_counter() - t)

    def _merge(self) -> None:
        from qtulu.evals.merge_search import merge_search

        s, ev, m = self.study, self.study.eval, self.study.merge
        t = time.perf_counter()
        key = self.plan.merge_key()
        self._attach(m.adapters)
        cols = {c.name: c for c in s.columns}
        res = merge_search(
            self.model, self.tok, m.adapters, m.tasks, data_dir=m.data_dir, out_dir=s.out / "merge",
            methods=m.spec.methods, weight_grid=m.spec.weights, densities=m.spec.densities, limit=m.spec.limit,
            batch_size=ev.batch_size, chat_format=ev.chat_format,
            task_options={t_: {"profile": ev.profile, **cols[t_].options} for t_ in m.tasks}, base_info=self.info,
            seed=m.spec.seed, include_inputs=True, progress=self.progress, judge=self.judges[m.tasks[0]],
            classifier=ev.toxigen_classifier, allow_code_execution=ev.allow_code_execution, workers=ev.workers,
            unsafe_no_isolation=ev.unsafe_no_isolation, columns={t_: cols[t_].task for t_ in m.tasks})
        best = res["best"]
        say(f"merge search: {len(res['candidates'])} candidates; best {best['name']} ({best['method']}, weights "
            f"{best['weights']}, density {best['density']}): objective {best['objective']:.3f} on the first "
            f"{m.spec.limit} examples per task")
        self.records.write("merge", key, {"adapters": m.adapters, "tasks": m.tasks},
                           {"adapter_sha256": self.plan.adapter_sha(m.name), "best": best,
                            "candidates": len(res["candidates"])}, time.perf_counter() - t)
