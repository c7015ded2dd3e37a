"""Merge search on two small adapters: every candidate scored, the best saved and reloadable."""

from __future__ import annotations

import json
import math

import pytest
import torch

OPTS = {"mmlu": {"subjects": ["world_religions", "miscellaneous"], "split": "dev"}}


@pytest.fixture(scope="module")
def pair(make_lora):
    from qtulu.model.load import load_base
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    tok = build_char_tokenizer()
    base, _ = load_base(build_tiny_llama(seed=0, dtype=torch.float32), quantize=None, compute_dtype=torch.float32,
                        device="cpu", attn_implementation=None, tokenizer=tok)
    return make_lora(base, seed=3), tok


def test_merge_search_picks_and_saves_the_best(pair, eval_data, tmp_path):
    from peft import PeftModel

    from qtulu.adapters.store import verify_adapter
    from qtulu.evals.merge_search import merge_search
    from qtulu.evals.runner import evaluate
    from qtulu.model.load import base_info
    from qtulu.model.tiny import build_tiny_llama

    model, tok = pair
    res = merge_search(model, tok, ["alpha", "beta"], ["mmlu"], data_dir=eval_data, out_dir=tmp_path,
                       methods=["linear", "cat"], weight_grid=[[0.7, 0.3], [0.3, 0.7]], limit=3,
                       task_options=OPTS, progress=False)
    rows = res["candidates"]
    # (the SVD methods take seconds per candidate on this CPU: dare_linear runs in test_cli's merge-search test)
    assert [r["method"] for r in rows] == ["input", "input"] + ["linear"] * 2 + ["cat"] * 2
    assert all(0.0 <= r["objective"] <= 1.0 for r in rows)
    merged = [r for r in rows if r["method"] != "input"]
    assert res["best"]["objective"] == max(r["objective"] for r in merged)
    assert sorted(model.peft_config) == ["alpha", "beta"]  # candidates removed, inputs kept
    table = (tmp_path / "merge_search.md").read_text()
    assert table.count("\n") == len(rows) + 2 and "**best**" in table
    assert json.loads((tmp_path / "merge_search.json").read_text())["best"]["name"] == res["best"]["name"]

    # the saved adapter is a verified qtulu adapter that reproduces the winner's slice score
    meta = verify_adapter(res["best_dir"], base_info=base_info(model))
    assert meta["extra"]["merge_search"]["method"] == res["best"]["method"]
    fresh = PeftModel.from_pretrained(build_tiny_llama(seed=0, dtype=torch.float32), res["best_dir"]).eval()
    again = evaluate(fresh, tok, ["mmlu"], data_dir=eval_data, out_dir=tmp_path / "again", limit=3,
                     task_options=OPTS, progress=False, report=False)
    assert math.isclose(again["results"]["model"]["mmlu"]["score"], res["best"]["scores"]["mmlu"])


def test_merge_search_rejects_bad_requests(pair, eval_data, tmp_path):
    from qtulu.evals.merge_search import merge_search

    model, tok = pair
    with pytest.raises(ValueError, match="at least two"):
        merge_search(model, tok, ["alpha"], ["mmlu"], data_dir=eval_data, out_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_search(model, tok, ["alpha", "beta"], ["mmlu"], data_dir=eval_data, out_dir=tmp_path, methods=["avg"])
    with pytest.raises(ValueError, match="do not match"):
        merge_search(model, tok, ["alpha", "beta"], ["mmlu"], data_dir=eval_data, out_dir=tmp_path,
                     methods=["linear"], weight_grid=[[1.0]])
