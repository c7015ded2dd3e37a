"""Intra-op thread choice (qtulu.model.threads): forced, small model, idle cores."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from qtulu.model import threads


def _spin() -> None:
    while True:
        pass


def test_forced_count_wins(monkeypatch):
    monkeypatch.setenv("QTULU_THREADS", "3")
    monkeypatch.setattr(threads, "free_cores", lambda *a, **k: pytest.fail("must not measure when forced"))
    assert threads.threads_for(10**9) == 3
    assert threads.threads_for(10) == 3


def test_small_model_gets_one_thread_without_measuring(monkeypatch):
    monkeypatch.delenv("QTULU_THREADS", raising=False)
    monkeypatch.setattr(threads, "free_cores", lambda *a, **k: pytest.fail("a small model needs no measurement"))
    assert threads.threads_for(threads.SMALL_MODEL_PARAMS - 1) == 1


@pytest.mark.parametrize("free, usable, want", [(None, 4, 4), (0, 4, 1), (1, 4, 1), (3, 4, 3), (8, 2, 2)])
def test_large_model_gets_the_idle_cores(monkeypatch, free, usable, want):
    monkeypatch.delenv("QTULU_THREADS", raising=False)
    monkeypatch.setattr(threads, "free_cores", lambda *a, **k: free)
    monkeypatch.setattr(threads, "usable_cores", lambda: usable)
    assert threads.threads_for(threads.SMALL_MODEL_PARAMS) == want


def test_free_cores_reads_the_busy_share(monkeypatch):
    samples = iter([(100, 1000), (150, 1200)])  # 50 of 200 jiffies busy: a quarter of the machine
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.free_cores(0) == 3
    samples = iter([(100, 1000), (250, 1200)])  # three quarters busy
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    assert threads.free_cores(0) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="free_cores reads /proc/stat (Linux)")
def test_a_busy_process_takes_a_core():
    """From the outside: with one spinning process beside it, at least one core is not free."""
    spinner = mp.get_context("fork").Process(target=_spin, daemon=True)
    spinner.start()
    try:
        free = threads.free_cores(0.5)
    finally:
        spinner.kill()
        spinner.join()
    assert free is not None and free <= (os.cpu_count() or 1) - 1
