"""Token ids and labels equal to open-instruct's ``encode_with_messages_format`` (finetune.py @ e44fcf588)
with its tokenizer set-up (slow LLaMA tokenizer, special tokens re-added as strings), re-implemented
on SentencePiece in open_instruct_ref.py, on real multi-turn conversations of the release samples."""

from __future__ import annotations

import copy
import json

import numpy as np

from qtulu.data.chat import IGNORE_INDEX, encode_batch, render_tulu, validate_messages
from qtulu.data.errors import BadRow


def _real_conversations(shared_data, ref, slow_llama):
    sd = shared_data
    trees = [json.loads(line) for line in sd("sources", "release_samples", "oasst1_trees_sample.jsonl").read_text().splitlines()]
    convs = ref.convert_oasst1(copy.deepcopy(trees), "2306")
    sharegpt = json.loads(sd("sources", "sharegpt_format_sample.json").read_text())
    convs += ref.convert_sharegpt(ref.split_sharegpt(sharegpt, lambda t: len(slow_llama(t)), 2048))[0]
    convs += ref.convert_baize(json.loads(sd("sources", "release_samples", "baize_quora_sample.json").read_text()))
    dolly = [json.loads(line) for line in sd("sources", "release_samples", "dolly_sample.jsonl").read_text().splitlines()]
    convs += ref.convert_instruction_rows(dolly, ref.seeded(42), ("instruction", "context", "response"))
    task = json.loads(sd("sources", "release_samples", "superni_task1149_item_check_edible.json").read_text())
    convs += ref.convert_super_ni([{**task, "Definition": [task["Definition"]]}], ref.seeded(42))[-5:]
    lima = json.loads(sd("sources", "lima.json").read_text())
    convs += [[{"role": "system", "content": "You are a helpful assistant."}] + sum(
        ([{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in r["history"]), [])
        + [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        for r in lima if r["history"]][:10]
    return convs


def test_ids_and_labels_equal_open_instruct(shared_data, ref, slow_llama, llama_tok):
    convs = _real_conversations(shared_data, ref, slow_llama)
    valid = []
    for c in convs:
        try:
            valid.append(validate_messages(c))
        except BadRow:
            pass  # an empty reply or a special-token string in the text (open-instruct would train on it)
    assert len(valid) >= len(convs) - 3
    multi = sum(1 for c in valid if sum(m["role"] == "assistant" for m in c) > 1)
    assert multi > 400
    after_eos = 0
    for conv, (ids, labels) in zip(valid, encode_batch(valid, llama_tok)):
        their_ids, their_labels = ref.encode_with_messages_format(conv, slow_llama, 10**6)
        assert ids.tolist() == their_ids, render_tulu(conv)[:200]
        assert labels.tolist() == their_labels
        eos = np.flatnonzero(ids[:-1] == llama_tok.eos_token_id)
        after_eos += len(eos)
        assert set(llama_tok.convert_ids_to_tokens(ids[eos + 1].tolist())) <= {"\u2581<"}  # never "<0x0A>" "<"
        assert ids[-1] == llama_tok.eos_token_id or conv[-1]["role"] != "assistant"  # no trailing newline token
    assert after_eos > 500


def test_truncated_examples_equal_open_instruct(shared_data, ref, slow_llama, llama_tok):
    """open-instruct tokenizes with max_length/truncation; qtulu's build cuts ids and labels at the
    same place (data.on_overlong: truncate)."""
    convs = [validate_messages(c) for c in _real_conversations(shared_data, ref, slow_llama)[:150]]
    cut = 0
    for conv, (ids, labels) in zip(convs, encode_batch(convs, llama_tok)):
        their_ids, their_labels = ref.encode_with_messages_format(conv, slow_llama, 96)
        assert ids[:96].tolist() == their_ids and labels[:96].tolist() == their_labels
        cut += len(ids) > 96
    assert cut > 50


def test_documented_difference_role_tags_after_an_assistant_turn(ref, slow_llama, llama_tok):
    """open-instruct masks only non-assistant messages, so the "<|assistant|>" tag of an assistant turn
    that follows another one (or opens the conversation) is trained on; qtulu trains on replies and
    their EOS only. Everything else is equal."""
    conv = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7."},
            {"role": "assistant", "content": "Also 11."}]
    (ids, labels), = encode_batch([conv], llama_tok)
    their_ids, their_labels = ref.encode_with_messages_format(conv, slow_llama, 2048)
    assert ids.tolist() == their_ids
    differ = [k for k, (a, b) in enumerate(zip(labels.tolist(), their_labels)) if a != b]
    assert all(labels[k] == IGNORE_INDEX for k in differ)
    assert llama_tok.decode(ids[differ]).strip() == "<|assistant|>"
