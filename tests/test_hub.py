"""Offline detection (qtulu.hub): with HF_HUB_OFFLINE or no route to the hub, a hub id that is not
in the local cache fails at once with one line, for a base model, a tokenizer and a dataset."""

from __future__ import annotations

import time

import pytest


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from qtulu import hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    hub.reset()
    yield hub
    hub.reset()


def _timed(fn):
    t0 = time.perf_counter()
    with pytest.raises(Exception) as info:
        fn()
    return info.value, time.perf_counter() - t0


def test_offline_env_fails_each_lookup_at_once(hub, monkeypatch, capsys):
    from qtulu.data.sources import load_source
    from qtulu.data.tokenizer import load_tokenizer
    from qtulu.model.load import resolve_checkpoint
    from qtulu.recipes import SourceSpec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_reason() == "HF_HUB_OFFLINE=1"
    lookups = {
        "base model 'someorg/no-model'": lambda: resolve_checkpoint("someorg/no-model"),
        "tokenizer 'someorg/no-tokenizer'": lambda: load_tokenizer("someorg/no-tokenizer"),
        "hub dataset 'someorg/no-dataset'": lambda: load_source(SourceSpec(name="d", format="dolly",
                                                                           hub_id="someorg/no-dataset")),
    }
    for what, fn in lookups.items():
        err, took = _timed(fn)
        print(f"{what}: {took:.2f}s")  # seconds (imports included), not the 25-45 s of retries
        assert isinstance(err, hub.HubUnreachable), (what, err)
        assert what in str(err) and "HF_HUB_OFFLINE=1" in str(err) and "\n" not in str(err)


def test_no_route_is_probed_once(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    reason = hub.offline_reason()
    assert reason and "no route to 127.0.0.1:9" in reason
    calls = []
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: calls.append(a))
    assert hub.offline_reason() == reason and not calls  # the answer is kept


def test_train_cli_offline_hub_base_is_one_line(hub, monkeypatch, tmp_path, capsys):
    from qtulu.cli import main
    from qtulu.demo.synthetic import make_examples, write_jsonl

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_jsonl(make_examples("upper", 5, split="train", seed=0), tmp_path / "d.jsonl")
    rc = main(["train", "demo", "-o", "model.base=someorg/no-model", "-o", f"sources.skill.path={tmp_path / 'd.jsonl'}",
               "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "base model 'someorg/no-model'" in err[0] and "unreachable" in err[0], err
