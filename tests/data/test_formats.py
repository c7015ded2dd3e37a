"""Each converter on fixture rows in its native schema: layouts, options and bad rows (by reason and
location). Parity with open-instruct on the real release rows is in test_parity_*.py."""

from __future__ import annotations

import json

import pytest

from qtulu.data.chat import validate_messages
from qtulu.data.errors import BadRow, DataError
from qtulu.data.formats import CONVERTERS, OPTIONS, Context, Filtered, check_options, convert
from qtulu.data.sources import load_source
from qtulu.recipes import FORMATS, SourceSpec


def run(fmt, rows, options=None, profile="plain", seed=42):
    """(conversations, bad rows, filtered reasons); the plain profile unless asked (fixed layout)."""
    out = list(convert(fmt, [(f"t[{i}]", r) for i, r in enumerate(rows)], options, Context(profile=profile, seed=seed)))
    good = [m for _, m in out if isinstance(m, list)]
    bad = [m for _, m in out if isinstance(m, BadRow)]
    return good, bad, [m.reason for _, m in out if isinstance(m, Filtered)]


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def test_registry_and_option_checks():
    assert set(CONVERTERS) == set(FORMATS) == set(OPTIONS)
    with pytest.raises(DataError, match="source 'x' .*unknown option.*'bogus'"):
        check_options("dolly", {"bogus": 1}, "x")
    with pytest.raises(DataError, match="option leaf_only='yes': expected bool"):
        check_options("oasst1", {"leaf_only": "yes"}, "x")
    with pytest.raises(DataError, match="option zero_shot=True: expected int or null"):
        check_options("cot", {"zero_shot": True}, "x")
    with pytest.raises(DataError, match="must be >= 0"):
        check_options("superni", {"n_few_shot": -1}, "x")
    with pytest.raises(DataError, match="portions='tulu_v3'"):
        check_options("flan_v2", {"portions": "tulu_v3"}, "x")
    check_options("oasst1", {"top_k_replies": None, "lang": "en"}, "x")
    with pytest.raises(ValueError, match="unknown data profile"):
        Context(profile="nope")


def test_alpaca_layouts_history_system_and_errors():
    good, bad, _ = run("alpaca", [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"instruction": "And now?", "input": "", "output": "Done.", "history": [["First", "One"], ["Second", "Two"]]},
        {"instruction": "Be nice", "output": "ok", "system": "You are kind."},
        {"instruction": "x"},
        {"instruction": None, "output": "y"},
        ["not", "an", "object"],
        {"instruction": "h", "output": "o", "history": [["only one"]]},
    ])
    assert good[0] == [U("Add\n\n1 2\n\n"), A("3")]  # open-instruct's random_template=False layout
    assert good[1] == [U("Hi\n\n"), A("Hello")]
    assert good[2] == [U("First"), A("One"), U("Second"), A("Two"), U("And now?"), A("Done.")]  # verbatim
    assert good[3][0] == {"role": "system", "content": "You are kind."}
    assert [b.reason for b in bad] == ["missing_field", "null_content", "bad_row_type", "bad_message"]
    assert bad[0].where == "t[4]" and "'output'" in bad[0].detail
    # the open_instruct profile: one template draw per templated row only (history rows draw none)
    a, _, _ = run("alpaca", [{"instruction": "Hi", "output": "Hello"}] * 3, profile="open_instruct", seed=3)
    b, _, _ = run("alpaca", [{"instruction": "Hi", "output": "Hello"}, {"instruction": "q", "output": "a", "history": [["u", "v"]]},
                             {"instruction": "Hi", "output": "Hello"}, {"instruction": "Hi", "output": "Hello"}],
                  profile="open_instruct", seed=3)
    assert a == [b[0], b[2], b[3]]


def test_dolly_self_instruct_unnatural_errors():
    _, bad, _ = run("dolly", [{"instruction": "x", "context": "", "response": 5}])
    assert [b.reason for b in bad] == ["bad_content_type"]
    good, bad, _ = run("self_instruct", [
        {"id": "seed_task_0", "instruction": "Sort.", "instances": [{"input": "3 1", "output": "1 3"}, {"input": "", "output": "none"}]},
        {"instruction": "Flat", "input": "in", "output": "out"},
        {"prompt": "P", "completion": "C"},
        {"instruction": "x", "instances": "nope"},
        {"instruction": "x", "instances": [{"input": "a"}]},
    ])
    assert good == [[U("Sort.\n\n3 1\n\n"), A("1 3")], [U("Sort.\n\n"), A("none")], [U("Flat\n\nin\n\n"), A("out")], [U("P"), A("C")]]
    assert [b.reason for b in bad] == ["bad_content_type", "missing_field"]
    _, bad, _ = run("unnatural_instructions", [{"instruction": "x"}, {"instances": []}, {"instruction": "i", "instances": [3]}])
    assert [b.reason for b in bad] == ["missing_field", "missing_field", "bad_message"]


def test_superni_small_tasks_and_bad_instances():
    task = {"Definition": ["Answer with the capital."], "Positive Examples": [{"input": "France", "output": "Paris"}],
            "Instances": [{"id": f"i{k}", "input": f"C{k}", "output": [f"X{k}", "alt"]} for k in range(5)]
            + [{"id": "bad", "input": "x", "output": []}]}
    good, bad, _ = run("superni", [task], {"zero_shot_per_task": 4, "few_shot_per_task": 2})
    # 6 instances, not more than 4 + 2: all of them in order; 4 zero-shot, then few-shot with the only positive example
    assert good[0] == [U("Answer with the capital.\n\nC0\n\n"), A("X0")]
    assert good[4] == [U("Answer with the capital.\n\nInput:\nFrance\nOutput:\nParis\n\nInput:\nC4\nOutput:\n"), A("X4")]
    assert len(good) == 5 and [(b.reason, b.where) for b in bad] == [("null_content", "t[0] Instances[5]")]
    _, bad, _ = run("superni", [{"Definition": [], "Instances": []}, {"Definition": "d"}, {"definition": "x", "inputs": "y"}])
    assert [b.reason for b in bad] == ["missing_field", "missing_field", "missing_field"]
    assert "Definition" in bad[0].detail and "Instances" in bad[1].detail


def test_flan_and_cot_rows_and_errors():
    rows = [{"inputs": "Q: 2+2?", "targets": "4", "template_type": "zs_opt"},
            {"inputs": "Answer:", "targets": "6", "template_type": "fs_opt"},
            {"inputs": "x\n", "targets": "y", "template_type": "zs_noopt"},
            {"inputs": "no target", "template_type": "zs_opt"}]
    good, bad, reasons = run("cot", rows)
    assert good == [[U("Q: 2+2?\n"), A("4")], [U("Answer:"), A("6")]]
    assert [b.reason for b in bad] == ["missing_field"] and reasons == ["template_type_not_used"]
    _, bad, _ = run("cot", [{"inputs": "a", "targets": "b"}])
    assert bad[0].reason == "missing_field" and "template_type" in bad[0].detail
    good, bad, _ = run("flan_v2", rows)
    assert len(good) == 3 and good[2] == [U("x\n"), A("y")] and [b.reason for b in bad] == ["missing_field"]
    _, bad, _ = run("flan_v2", [{"inputs": "a", "targets": "b"}], {"resample": 0})
    assert [b.reason for b in bad] == ["unknown_flan_submix"]


def test_messages_and_dataset_filter():
    rows = [{"dataset": "dolly", "messages": [U("a"), A("b")]}, {"dataset": "science.qasper", "messages": [U("c"), A("d")]},
            {"dataset": "oasst1", "messages": [U("e"), A("f")]}, {"dataset": "dolly", "text": "x"}]
    good, bad, _ = run("messages", rows)
    assert len(good) == 3 and [b.reason for b in bad] == ["missing_field"]
    assert run("messages", rows[:3], {"dataset": "science"})[0] == [[U("c"), A("d")]]
    assert len(run("messages", rows[:3], {"dataset": ["dolly", "oasst1"]})[0]) == 2
    with pytest.raises(DataError, match=r"no row with dataset 'cot' \(datasets present: dolly \(1\), oasst1 \(1\)"):
        run("messages", rows[:3], {"dataset": "cot"})


@pytest.mark.parametrize("fname,fmt,rows", [
    ("code_alpaca_2k.json", "alpaca", 2017),
    ("lima.json", "alpaca", 1029),
    ("sharegpt_format_sample.json", "sharegpt", 500),
    ("self_instruct_seed_tasks.jsonl", "self_instruct", 175),
    ("self_instruct_user_oriented.jsonl", "self_instruct", 252),
    ("release_samples/dolly_sample.jsonl", "dolly", 11),
    ("release_samples/oasst1_trees_sample.jsonl", "oasst1", 60),
    ("release_samples/baize_quora_sample.json", "baize", 1),
    ("release_samples/superni_task1149_item_check_edible.json", "superni", 1),
])
def test_real_shared_sources_convert(shared_data, fname, fmt, rows):
    path = shared_data("sources", *fname.split("/"))
    loaded = load_source(SourceSpec(name=fname, format=fmt, path=str(path)))
    assert len(loaded.rows) == rows and str(path) in loaded.inputs["files"]
    out = list(convert(fmt, loaded.rows))
    good = [m for _, m in out if isinstance(m, list)]
    assert not [m for _, m in out if isinstance(m, (BadRow, Filtered))]
    assert len(good) >= rows
    empty = 0
    for msgs in good:
        try:
            v = validate_messages(msgs)
        except BadRow as e:
            assert e.reason == "empty_assistant_turn"  # the code-alpaca sample has 2 rows with an empty output
            empty += 1
            continue
        assert v[-1]["role"] == "assistant" and v[0]["role"] in ("user", "system")
    assert empty <= 2
    if fname.endswith(".jsonl"):
        assert loaded.rows[0][0].endswith(f"{path.name}:1")
        first = json.loads(path.read_text().splitlines()[0])
        if "instances" in first:
            assert good[0][-1]["content"] == first["instances"][0]["output"].strip()
