"""`qtulu bench e2e`: QLoRA training throughput and memory, qtulu against the HF stack.

For each shape, every configuration runs the same documents (real lengths, random token ids) for
the same steps, each in a fresh process so that its peak memory is its own (see ``server.py``):

- ``qtulu``: qtulu NF4 linears (Triton kernel on a GPU), packed rows, ``qtulu_varlen`` attention;
- ``qtulu-no-nf4-kernel``: the same with the NF4 matmul on its plain-torch reference;
- ``qtulu-no-varlen``: the same with SDPA on the packed row (transformers builds the
  block-diagonal mask from ``position_ids``) instead of the varlen kernel;
- ``baseline``: transformers + peft + bitsandbytes NF4 (double quant, bf16 compute), SDPA,
  padded micro-batches (see ``lengths.py``).
All use LoRA r=64 on every linear, gradient checkpointing and the same optimizer (torch AdamW,
or bitsandbytes' 8-bit AdamW with ``--optimizer adamw_8bit``). On a CPU both qtulu
kernels resolve to their torch references (backend "auto"), so the A/B rows only mean something
on a GPU; CPU runs exercise the code path and make no speed claim.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import select
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from qtulu.bench.build import OPTIMIZERS
from qtulu.bench.lengths import DEFAULT_RECIPE, pack_bfd, read_lengths_file, select_rows, token_lengths
from qtulu.bench.report import append_record, ratios, write_chart
from qtulu.model.shapes import get_shape
from qtulu.files import atomic_write_text

CONFIGS: dict[str, dict[str, str]] = {
    "qtulu": {"stack": "qtulu", "nf4_backend": "auto", "attention": "qtulu_varlen", "batching": "packed"},
    "qtulu-no-nf4-kernel": {"stack": "qtulu", "nf4_backend": "torch", "attention": "qtulu_varlen", "batching": "packed"},
    "qtulu-no-varlen": {"stack": "qtulu", "nf4_backend": "auto", "attention": "sdpa", "batching": "packed"},
    "baseline": {"stack": "baseline", "batching": "padded"},
}

REPO = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    return Path(os.environ.get("QTULU_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_lengths(
    *, lengths_file: str | None, recipe: str | None, tokenizer: str | None, max_docs: int | None, seed: int,
    seq_len: int | None = None, overrides=(),
) -> tuple[list[int], str]:
    """Document lengths and a description of where they came from: a lengths file, or a recipe
    built by the data pipeline (default: the real sources of ../shared/data, `lengths.DEFAULT_RECIPE`)."""
    if lengths_file:
        return read_lengths_file(lengths_file), str(lengths_file)
    path = Path(recipe) if recipe and Path(recipe).exists() else None
    if recipe is None:
        path = DEFAULT_RECIPE
        data = default_data_dir()
        for what, p in (("sources directory", data / "sources"), ("tokenizer", data / "tokenizers" / "llama")):
            if not p.exists():
                raise FileNotFoundError(
                    f"{what} not found: {p} (the default recipe {_short(DEFAULT_RECIPE)} reads ../shared/data); "
                    "pass --recipe NAME_OR_PATH (any recipe: its sources go through the data pipeline) "
                    "or --lengths-file FILE (one document length per line)"
                )
    lengths = token_lengths(path or recipe, tokenizer=tokenizer, seq_len=seq_len, overrides=overrides,
                            max_docs=max_docs, seed=seed)
    where = _short(path) if path else str(recipe)
    return lengths, f"recipe {where}" + (f" under {tokenizer}" if tokenizer else "")


def _short(path: Path) -> str:
    """A path relative to the repo when that is shorter (docs should not name this machine's dirs)."""
    rel = os.path.relpath(path.resolve(), REPO)
    return rel if len(rel) < len(str(path)) else str(path)


class ForkServer:
    """Runs configurations in fresh processes forked from one preloaded server (see ``server.py``)."""

    def __init__(self, *, cpu: bool = False) -> None:
        """``cpu=True``: preload the heavy imports once (unsafe with CUDA, see ``server.py``) and
        make peak RSS track live memory."""
        env = dict(os.environ)
        if cpu:
            # a fixed mmap threshold makes glibc give large freed blocks back to the OS, so that
            # peak RSS (the CPU memory figure) tracks live tensors instead of allocator slack
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qtulu.bench.server", *(["--preload"] if cpu else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server (idle between runs, it holds no state: no need to wait for a slow
        interpreter shutdown with torch loaded)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.terminate()
            self.proc.wait()

    def _reply(self, timeout: float | None) -> dict[str, Any] | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark fork server exited (code {self.proc.poll()}); see the messages above")
        return json.loads(line)

    def run(self, spec: dict[str, Any], workdir: Path, timeout: float | None = None) -> dict[str, Any]:
        """Run one configuration in a fresh child and return its result."""
        stem = f"{spec['shape']['name']}__{spec['name']}"
        spec_path, result_path = workdir / f"{stem}.spec.json", workdir / f"{stem}.result.json"
        spec_path.write_text(json.dumps(spec))
        result_path.unlink(missing_ok=True)
        self.proc.stdin.write(f"{spec_path}\t{result_path}\n")
        self.proc.stdin.flush()
        pid = self._reply(None)["pid"]
        done = self._reply(timeout)
        timed_out = done is None
        if timed_out:
            os.kill(pid, signal.SIGKILL)
            done = self._reply(None)
        if timed_out:
            return {"name": spec["name"], "status": "error", "error": f"timed out after {timeout} s"}
        if result_path.exists():
            return json.loads(result_path.read_text())
        code = done["exitcode"]
        why = "killed (host out of memory?)" if code < 0 else "no result; see the traceback above"
        return {"name": spec["name"], "status": "crashed", "error": f"exit code {code}: {why}"}


def run_isolated(spec: dict[str, Any], workdir: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run one configuration in its own process (a one-off fork server)."""
    with ForkServer(cpu=spec["device"] == "cpu") as server:
        return server.run(spec, workdir, timeout)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def run_e2e(
    shapes: Sequence[str],
    *,
    seq_len: int,
    steps: int,
    warmup: int,
    configs: Sequence[str] = tuple(CONFIGS),
    device: str = "auto",
    dtype: str = "auto",
    lengths_file: str | None = None,
    recipe: str | None = None,
    tokenizer: str | None = None,
    max_docs: int | None = None,
    overrides=(),
    lora: dict[str, Any] | None = None,
    seed: int = 0,
    peak_tflops: float | None = None,
    out_dir: str | Path | None = None,
    chart: bool = True,
    record: bool = False,
    docs_path: str | Path | None = None,
    command: str | None = None,
    timeout: float | None = None,
    progress: bool = False,
    threads: int | None = None,
    build_only: bool = False,
    optimizer: str = "adamw",
    server: ForkServer | None = None,
    log=print,
) -> dict[str, Any]:
    """Run every (shape, configuration) and return the summary (also written to out_dir).

    Each configuration runs in a fresh child of ``server`` (a new `ForkServer` when None)."""
    shape_specs, device, dtype = _check(shapes, configs, seq_len, steps, warmup, device, dtype, optimizer)
    lora = {"r": 64, "alpha": 16, "dropout": 0.1, **(lora or {})}

    lengths, source = load_lengths(
        lengths_file=lengths_file, recipe=recipe, tokenizer=tokenizer, max_docs=max_docs, seed=seed,
        seq_len=seq_len, overrides=overrides,
    )
    packed = pack_bfd(lengths, seq_len)
    timed = select_rows(packed, steps, seed=seed)
    # warmup replays the timed rows: Triton compiles/autotunes per shape (total tokens, longest
    # document), so the timed steps see only shapes already met, the steady state of a long run
    rows = [timed[i % steps] for i in range(warmup)] + timed
    now = dt.datetime.now(dt.timezone.utc)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="qtulu-bench-e2e-"))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "configs"
    work.mkdir(exist_ok=True)

    common = {"seq_len": seq_len, "device": device, "dtype": dtype, "rows": rows, "warmup": warmup, "lora": lora,
              "seed": seed, "peak_tflops": peak_tflops, "progress": progress, "threads": threads,
              "build_only": build_only, "optimizer": optimizer}
    with contextlib.nullcontext(server) if server is not None else ForkServer(cpu=device == "cpu") as server:
        results = _run_configs(server, shape_specs, configs, common, work, timeout, log)
    ratios(results)
    # the parent never initializes CUDA (a context here would cost the children ~0.5 GB): the
    # device name and peak come back from the children
    device_name = next((r["device_name"] for r in results if r.get("device_name")), device)
    peak = next((r["peak_tflops"] for r in results if r.get("peak_tflops")), None)

    fill = sum(map(sum, packed)) / (len(packed) * seq_len)
    summary: dict[str, Any] = {
        "benchmark": "e2e",
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "dtype": dtype,
        "seq_len": seq_len,
        "steps": steps,
        "warmup": warmup,
        "build_only": build_only,
        "optimizer": optimizer,
        "lora": lora,
        "peak_tflops": peak,
        "lengths": {
            "source": source,
            "docs": len(lengths),
            "mean": statistics.fmean(lengths),
            "packed_rows": len(packed),
            "row_fill": fill,
            "tokens_per_timed_step": [sum(r) for r in rows[warmup:]],
        },
        "command": command or "qtulu bench e2e",
        "note": "CPU run: exercises the code path only, no speed claim" if device == "cpu" else None,
        "versions": _versions(),
        "host": platform.node(),
        "results": [{k: v for k, v in r.items() if k != "traceback"} for r in results],
    }
    chart_path = None
    if chart:
        title = f"qtulu bench e2e, seq {seq_len}, {device_name}, {summary['date']}"
        if device == "cpu":
            title += "\nCPU run: code path only, no speed claim"
        chart_path = write_chart(results, out / "bench_e2e.png", title)
        summary["chart"] = str(chart_path)
    if record:
        _record(summary, results, chart_path, docs_path, now, log)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    summary["out_dir"] = str(out)
    return summary


def _check(shapes, configs, seq_len, steps, warmup, device, dtype, optimizer):
    """The shapes, with ``auto`` device and dtype resolved; a ValueError naming a bad argument."""
    import torch

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    for name in configs:
        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    shape_specs = [get_shape(s) for s in shapes]
    if seq_len <= 0 or steps <= 0 or warmup < 0:
        raise ValueError("need seq_len > 0, steps > 0, warmup >= 0")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available to torch {torch.__version__}")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return shape_specs, device, dtype


def _run_configs(server, shape_specs, configs, common, work, timeout, log) -> list[dict[str, Any]]:
    """Every (shape, configuration), each in its own child of ``server``; failures are logged."""
    results: list[dict[str, Any]] = []
    for shape, name in [(shape, name) for shape in shape_specs for name in configs]:
        spec = {"name": name, **CONFIGS[name], "shape": shape.to_dict(), **common}
        log(f"[bench e2e] {shape.name} / {name} ...", flush=True)
        res = server.run(spec, work, timeout=timeout)
        res["shape"] = shape.name
        if res["status"] != "ok":
            log(f"[bench e2e] {shape.name} / {name}: {res['status']}: {res.get('error')}", flush=True)
            if res.get("traceback"):
                log(res["traceback"], flush=True)
        results.append(res)
    return results


def _record(summary, results, chart_path, docs_path, now, log) -> None:
    """Append the run to docs/benchmarks.md (its chart copied beside it), unless a configuration failed."""
    failed = [f"{r['shape']}/{r['name']}" for r in results if r["status"] not in ("ok", "oom")]
    if failed:
        log(f"[bench e2e] not recorded: {', '.join(failed)} did not run; see the errors above", flush=True)
        return
    docs = Path(docs_path) if docs_path else REPO / "docs" / "benchmarks.md"
    recorded_chart = None
    if chart_path is not None:
        stamp = now.strftime("%Y%m%d-%H%M")
        dev = "".join(c if c.isalnum() else "-" for c in summary["device"]).strip("-").lower()
        recorded_chart = docs.parent / "img" / f"bench_e2e_{stamp}_{dev}.png"
        recorded_chart.parent.mkdir(parents=True, exist_ok=True)
        recorded_chart.write_bytes(chart_path.read_bytes())
    append_record(docs, summary, results, recorded_chart)
    summary["recorded"] = str(docs)


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this run was started, for the record (``qtulu bench e2e ...`` or the wrapper script)."""
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else "qtulu"
    if prog == "__main__.py":
        prog = "python -m qtulu"
    elif prog.endswith(".py"):
        prog = f"python {os.path.relpath(argv[0]) if not os.path.isabs(argv[0]) else argv[0]}"
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])
