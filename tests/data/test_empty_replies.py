"""Empty replies under ``data.profile: open_instruct``: kept as open-instruct keeps them.

open-instruct's converters keep a row whose output is empty (reformat_datasets.py @ e44fcf588), and
``encode_with_messages_format`` (finetune.py @ e44fcf588 and 7c5ee77a1, slow LLaMA tokenizer) renders
it ``<|assistant|>\\n</s>``: the slow tokenizer strips the newline before ``</s>``, the prompt mask is
counted with that newline (one token more) and so covers the EOS; nothing of the turn is trained
on, and finetune.py's ``labels != -100`` filter drops an example left with no label. The oracle
(open_instruct_ref.py) shows it; qtulu must give the same ids, labels and kept rows.
"""

from __future__ import annotations

import json

import pytest

from qtulu.data.build import build_dataset
from qtulu.data.chat import IGNORE_INDEX, encode_batch, validate_messages
from qtulu.data.errors import BadRow, DataError
from qtulu.recipes import load_recipe

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731

CASES = [
    [U("Write a function."), A("")],                                   # single turn, empty reply
    [U("a"), A("  "), U("b"), A("c")],                                 # an empty reply mid-conversation
    [{"role": "system", "content": "Be brief."}, U("a"), A(""), U("b"), A("")],
    [U("a"), A("x"), U("b"), A("")],                                   # empty last reply after a real one
]


@pytest.mark.parametrize("conv", CASES)
def test_ids_and_labels_equal_open_instruct(conv, ref, slow_llama, llama_tok):
    clean = validate_messages(conv, allow_empty_reply=True)
    (ids, labels), = encode_batch([clean], llama_tok)
    their_ids, their_labels = ref.encode_with_messages_format(conv, slow_llama, 10**6)
    assert ids.tolist() == their_ids
    assert labels.tolist() == their_labels


def test_plain_profile_still_refuses_empty_replies():
    with pytest.raises(BadRow, match="empty_assistant_turn"):
        validate_messages([U("q"), A(" ")])


def test_real_code_alpaca_builds_with_the_shipped_recipe(shared_data, ref, slow_llama, llama_tokenizer_path):
    """The shipped code_alpaca recipe (on_bad_row: error) builds the real Code-Alpaca sample; the rows
    kept are exactly those open-instruct trains on, and the empty replies are counted."""
    path = shared_data("sources", "code_alpaca_2k.json")
    rows = json.loads(path.read_text())
    empty = sum(1 for r in rows if not r["output"].strip())
    assert empty == 2  # the sample holds two rows with an empty output (as the full file does)
    recipe = load_recipe("code_alpaca", [f"sources.code_alpaca.path={path}", "data.max_seq_len=100000"])
    assert recipe.data.on_bad_row == "error" and recipe.data.profile == "open_instruct"
    built = build_dataset(recipe, str(llama_tokenizer_path), progress=False)
    m = built.manifest
    assert m["empty_replies_by_source"] == {"code_alpaca": empty}
    assert m["dropped"] == {"empty_reply": empty}
    # open-instruct: convert with the same seed, encode, keep what has a label
    convs = ref.convert_instruction_rows(rows, ref.seeded(42))
    theirs = [ref.encode_with_messages_format(c, slow_llama, 10**6) for c in convs]
    kept = [(i, l) for i, l in theirs if any(x != IGNORE_INDEX for x in l)]
    assert len(kept) == len(rows) - empty == m["examples"]
    assert m["tokens"] == sum(len(i) for i, _ in kept)
    assert m["supervised_tokens"] == sum(sum(x != IGNORE_INDEX for x in l) for _, l in kept)


def test_plain_profile_stops_at_the_empty_reply(tmp_path, shared_data, llama_tokenizer_path):
    path = shared_data("sources", "code_alpaca_2k.json")
    recipe = load_recipe("code_alpaca", [f"sources.code_alpaca.path={path}", "data.profile=plain"])
    with pytest.raises(DataError, match=r"code_alpaca_2k.json\[\d+\]: bad row \(empty_assistant_turn\)"):
        build_dataset(recipe, str(llama_tokenizer_path), progress=False)

