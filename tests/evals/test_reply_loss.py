"""reply_loss: a source's held-out rows, scored as the training loss scores them (masked NLL per reply token)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qtulu.data.build import held_out_conversations
from qtulu.data.chat import IGNORE_INDEX, encode_batch
from qtulu.evals.lm import LM
from qtulu.evals.runner import run_task
from qtulu.evals.tasks import TaskOptionError, get_task
from qtulu.evals.tasks._common import TaskConfigError, TaskDataError
from qtulu.recipes import SourceSpec

DOLLY = ("sources", "release_samples", "dolly_sample.jsonl")
OASST = ("sources", "release_samples", "oasst1_trees_sample.jsonl")


def _plain_torch(model, tok, spec: SourceSpec, L: int):
    """The held-out conversations encoded as training encodes them, each scored alone (no padding)
    with the model's forward and cross_entropy: (total NLL, tokens, n scored, n fully truncated)."""
    convs, _ = held_out_conversations(spec, tok, max_seq_len=L)
    total, tokens, n, gone = 0.0, 0, 0, 0
    for ids, labels in encode_batch([m for _, m in convs], tok, "tulu"):
        ids, labels = torch.tensor(ids[:L], dtype=torch.long), torch.tensor(labels[:L], dtype=torch.long)
        if not (labels != IGNORE_INDEX).any():
            gone += 1
            continue
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].double()  # (T, V)
        total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels[1:] != IGNORE_INDEX).sum())
        n += 1
    return total, tokens, n, gone


@pytest.mark.parametrize("parts,fmt,k,L", [(DOLLY, "dolly", 4, 160), (OASST, "oasst1", 3, 512)])
def test_reply_loss_equals_the_masked_nll_of_plain_torch(shared_data, tiny, parts, fmt, k, L):
    model, tok = tiny
    path = shared_data(*parts)
    opts = {"format": fmt, "path": str(path), "hold_out": k, "max_seq_len": L}
    m = run_task(LM(model, tok, batch_size=3), "reply_loss", data_dir=path.parent, task_options=opts)
    total, tokens, n, gone = _plain_torch(model, tok, SourceSpec(name="s", format=fmt, path=str(path), hold_out=k), L)
    assert n > 0 and m["n"] == n and m["tokens"] == tokens
    assert m["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert m["score"] == pytest.approx(math.exp(-total / tokens), rel=1e-5) and 0 < m["score"] < 1
    assert m["excluded"] == ({"truncated_away": gone} if gone else {})
    assert m["held_out"]["held_out"] == k and m["comparable"] is False and "not a paper benchmark" in m["comparability"]
    if fmt == "dolly":
        assert gone, "at 160 characters some dolly prompts leave no reply token: the exclusion is exercised"
    # batch-size independent, and a relative path is read under the data folder
    again = run_task(LM(model, tok, batch_size=1), "reply_loss", data_dir=path.parent.parent,
                     task_options={**opts, "path": f"{path.parent.name}/{path.name}"})
    assert again["loss"] == pytest.approx(m["loss"], rel=1e-5) and again["n"] == m["n"]


def test_load_returns_only_the_held_out_rows(shared_data):
    from qtulu.data.holdout import split_rows
    from qtulu.data.sources import load_source

    path = shared_data(*OASST)
    task = get_task("reply_loss", format="oasst1", path=str(path), hold_out=5)
    examples = task.module.load(None, **task.opts)
    rows = load_source(SourceSpec(name="o", format="oasst1", path=str(path))).rows
    held = split_rows("oasst1", rows, 5, "o").held
    assert [e["id"] for e in examples] == [w for w, _ in held] and len(examples) == 5
    assert len(task.module.load(None, **{**task.opts, "limit": 2})) == 2


def test_bad_options_are_one_line_errors(shared_data, tmp_path):
    path = shared_data(*DOLLY)
    cases = [
        ({"format": "nope", "path": str(path), "hold_out": 3}, TaskConfigError, "format='nope'"),
        ({"format": "dolly", "hold_out": 3}, TaskConfigError, "option path"),
        ({"format": "dolly", "path": str(path)}, TaskConfigError, "hold_out=None"),
        ({"format": "dolly", "path": str(path), "hold_out": 1.5}, TaskConfigError, "hold_out=1.5"),
        ({"format": "dolly", "path": "missing.jsonl", "hold_out": 3}, TaskDataError, "missing.jsonl"),
        ({"format": "dolly", "path": str(path), "hold_out": 11}, TaskDataError, "nothing left to train on"),
    ]
    for opts, exc, text in cases:
        task = get_task("reply_loss", **opts)
        with pytest.raises(exc) as e:
            task.module.load(tmp_path, **task.opts)
        assert text in str(e.value) and "\n" not in str(e.value), opts
    with pytest.raises(TaskOptionError, match="unknown option 'holdout'"):
        get_task("reply_loss", holdout=3)


def test_cell_key_follows_the_source_file_not_its_spelling(shared_data, tmp_path):
    from qtulu.evals.cells import cell_key

    path = shared_data(*DOLLY)
    copy = tmp_path / "elsewhere" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    kw = dict(data_dir=tmp_path, limit=None, chat_format="tulu", batch_size=8, max_length=None)
    key = lambda p, k=3: cell_key({}, get_task("reply_loss", format="dolly", path=str(p), hold_out=k), **kw)[0]  # noqa: E731
    assert key(path) == key(copy) != key(copy, 4)
    copy.write_bytes(path.read_bytes() + b'{"instruction": "x", "context": "", "response": "y"}\n')
    assert key(copy) != key(path)
