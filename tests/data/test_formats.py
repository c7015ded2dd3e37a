"""One test per converter, on fixture rows written in that native schema; the real files where present."""

from __future__ import annotations

import json

import pytest

from qtulu.data.chat import validate_messages
from qtulu.data.errors import BadRow, DataError
from qtulu.data.formats import CONVERTERS, OPTIONS, check_options, convert
from qtulu.data.sources import load_source
from qtulu.recipes import FORMATS, SourceSpec


def run(fmt, rows, options=None):
    """Converted conversations and bad rows of ``rows`` (a list of dicts)."""
    out = list(convert(fmt, [(f"t[{i}]", r) for i, r in enumerate(rows)], options))
    good = [m for _, m in out if not isinstance(m, BadRow)]
    bad = [m for _, m in out if isinstance(m, BadRow)]
    return good, bad


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def test_registry_matches_recipe_formats():
    assert set(CONVERTERS) == set(FORMATS) == set(OPTIONS)
    with pytest.raises(DataError, match="source 'x' .*unknown option.*'bogus'"):
        check_options("dolly", {"bogus": 1}, "x")


def test_alpaca_with_input_history_and_errors():
    good, bad = run("alpaca", [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"instruction": "And now?", "input": "", "output": "Done.", "history": [["First", "One"], ["Second", "Two"]]},
        {"instruction": "x"},
        {"instruction": None, "output": "y"},
        ["not", "an", "object"],
    ])
    assert good[0] == [U("Add\n\n1 2"), A("3")]
    assert good[1] == [U("Hi"), A("Hello")]
    assert good[2] == [U("First"), A("One"), U("Second"), A("Two"), U("And now?"), A("Done.")]
    assert [b.reason for b in bad] == ["missing_field", "null_content", "bad_row_type"]
    assert bad[0].where == "t[3]" and "'output'" in bad[0].detail


def test_dolly():
    good, bad = run("dolly", [
        {"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada.", "category": "closed_qa"},
        {"instruction": "Why?", "context": "", "response": "Because."},
        {"instruction": "x", "context": "", "response": 5},
    ])
    assert good == [[U("Who?\n\nAda wrote it."), A("Ada.")], [U("Why?"), A("Because.")]]
    assert [b.reason for b in bad] == ["bad_content_type"]


def _oasst(mid, parent, role, text, **kw):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "lang": kw.pop("lang", "en"), **kw}


def test_oasst1_trees_to_root_to_leaf_paths():
    rows = [
        _oasst("r", None, "prompter", "Q?"),
        _oasst("a1", "r", "assistant", "A1", rank=1),
        _oasst("a0", "r", "assistant", "A0", rank=0),
        _oasst("p1", "a0", "prompter", "More?"),
        _oasst("a2", "p1", "assistant", "Sure."),
        _oasst("p2", "a1", "prompter", "dangling prompt"),  # no reply: path ends at a1
        _oasst("gone", "r", "assistant", "deleted", deleted=True),
        _oasst("child_of_gone", "gone", "prompter", "x"),
        _oasst("r2", None, "prompter", "Hola", lang="es"),
        _oasst("b", "r2", "assistant", "Hola!"),
        _oasst("orphan", "missing", "assistant", "lost"),
        {"message_id": "bad", "parent_id": "r", "role": "moderator", "text": "x"},
    ]
    good, bad = run("oasst1", rows)
    assert [U("Q?"), A("A0"), U("More?"), A("Sure.")] in good
    assert [U("Q?"), A("A1")] in good
    assert [U("Hola"), A("Hola!")] in good
    assert len(good) == 3
    assert sorted(b.reason for b in bad) == ["orphan_message", "unknown_role"]
    top1, _ = run("oasst1", rows, {"top_k_replies": 1, "lang": "en"})
    assert top1 == [[U("Q?"), A("A0"), U("More?"), A("Sure.")]]


def test_sharegpt_roles_leading_gpt_and_errors():
    good, bad = run("sharegpt", [
        {"id": "1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                                      {"from": "chatgpt", "value": "Bye!"}]},
        {"id": "2", "conversations": [{"from": "gpt", "value": "orphan reply"}, {"from": "human", "value": "Q"},
                                      {"from": "gpt", "value": "A"}]},
        {"id": "3", "conversations": [{"from": "robot", "value": "?"}]},
        {"id": "4"},
    ])
    assert good[0] == [{"role": "system", "content": "Be brief."}, U("Hi"), A("Hello"), U("Bye"), A("Bye!")]
    assert good[1] == [U("Q"), A("A")]
    assert [b.reason for b in bad] == ["unknown_role", "missing_field"]


def test_self_instruct_instances_flat_and_prompt_completion():
    good, bad = run("self_instruct", [
        {"id": "seed_task_0", "instruction": "Sort.", "instances": [{"input": "3 1", "output": "1 3"}, {"input": "", "output": "nothing"}],
         "is_classification": False},
        {"instruction": "Flat", "input": "in", "output": "out"},
        {"prompt": "P", "completion": "C"},
        {"instruction": "x", "instances": "nope"},
    ])
    assert good == [[U("Sort.\n\n3 1"), A("1 3")], [U("Sort."), A("nothing")], [U("Flat\n\nin"), A("out")], [U("P"), A("C")]]
    assert [b.reason for b in bad] == ["bad_content_type"]


def test_unnatural_instructions():
    row = {"instruction": "Is it a fruit?",
           "instances": [{"instruction_with_input": "Is it a fruit? Apple", "input": "Apple", "constraints": "Answer Yes or No.", "output": "Yes"},
                         {"instruction_with_input": "Is it a fruit? Rock", "input": "Rock", "constraints": "None", "output": "No"}],
           "reformulations": [{"instruction_with_input": "Fruit check: Pear", "input": "Pear", "constraints": "None", "output": "Yes"}]}
    good, bad = run("unnatural_instructions", [row, {"instruction": "x"}])
    assert good == [[U("Is it a fruit? Apple\nAnswer Yes or No."), A("Yes")], [U("Is it a fruit? Rock"), A("No")]]
    assert [b.reason for b in bad] == ["missing_field"]
    good, _ = run("unnatural_instructions", [row], {"reformulations": True})
    assert len(good) == 3 and good[2] == [U("Fruit check: Pear"), A("Yes")]


def test_superni_task_files_zero_few_and_instance_rows():
    task = {"Definition": ["Answer with the capital."], "Positive Examples": [
        {"input": "France", "output": "Paris", "explanation": "."}, {"input": "Italy", "output": "Rome", "explanation": "."},
        {"input": "Spain", "output": "Madrid", "explanation": "."}],
        "Instances": [{"id": f"i{k}", "input": f"C{k}", "output": [f"X{k}", "alt"]} for k in range(10)]}
    zero, _ = run("superni", [task], {"shots": "zero"})
    assert len(zero) == 10
    assert zero[0] == [U("Definition: Answer with the capital.\n\nNow complete the following example -\nInput: C0\nOutput:"), A("X0")]
    few, _ = run("superni", [task], {"shots": "few", "num_pos_examples": 2})
    assert few[0][0]["content"] == ("Definition: Answer with the capital.\n\nPositive Example 1 -\nInput: France\nOutput: Paris\n\n"
                                    "Positive Example 2 -\nInput: Italy\nOutput: Rome\n\nNow complete the following example -\nInput: C0\nOutput:")
    mixed, _ = run("superni", [task], {"shots": "mixed", "seed": 1, "max_instances_per_task": 8})
    n_few = sum("Positive Example" in m[0]["content"] for m in mixed)
    assert len(mixed) == 8 and 0 < n_few < 8
    assert run("superni", [task], {"shots": "mixed", "seed": 1, "max_instances_per_task": 8})[0] == mixed  # seeded
    flat, bad = run("superni", [{"definition": "Negate.", "inputs": "yes", "targets": "no"}, {"Definition": "d", "Instances": [{"input": "x"}]}],
                    {"shots": "zero"})
    assert flat == [[U("Definition: Negate.\n\nNow complete the following example -\nInput: yes\nOutput:"), A("no")]]
    assert [b.reason for b in bad] == ["null_content"]


@pytest.mark.parametrize("fmt", ["flan_v2", "cot"])
def test_flan_and_cot_inputs_targets_with_shot_filter(fmt):
    rows = [{"inputs": "Q: 2+2?", "targets": "2+2=4. The answer is 4.", "template_type": "zs_opt", "task_name": "t"},
            {"inputs": "Q: 1+1? A: 2\n\nQ: 3+3?", "targets": "6", "template_type": "fs_noopt"},
            {"inputs": "no target"}]
    good, bad = run(fmt, rows)
    assert good == [[U("Q: 2+2?"), A("2+2=4. The answer is 4.")], [U("Q: 1+1? A: 2\n\nQ: 3+3?"), A("6")]]
    assert [b.reason for b in bad] == ["missing_field"]
    assert run(fmt, rows[:2], {"shots": "zero"})[0] == good[:1]
    assert run(fmt, rows[:2], {"shots": "few"})[0] == good[1:]


def test_baize_transcript():
    row = {"topic": "t", "input": "The conversation between human and AI assistant.\n[|Human|] How do I sort?\n[|AI|] Use sorted().\n"
                                  "[|Human|] Thanks\n[|AI|] You're welcome.\n[|Human|] "}
    good, bad = run("baize", [row, {"input": "no markers"}])
    assert good == [[U(" How do I sort?\n"), A(" Use sorted().\n"), U(" Thanks\n"), A(" You're welcome.\n")]]
    assert validate_messages(good[0])[0]["content"] == "How do I sort?"
    assert [b.reason for b in bad] == ["bad_transcript"]


def test_messages():
    good, bad = run("messages", [{"messages": [U("a"), A("b")]}, {"text": "x"}])
    assert good == [[U("a"), A("b")]] and [b.reason for b in bad] == ["missing_field"]


@pytest.mark.parametrize("fname,fmt,rows", [
    ("code_alpaca_2k.json", "alpaca", 2017),
    ("lima.json", "alpaca", 1029),
    ("sharegpt_format_sample.json", "sharegpt", 500),
    ("self_instruct_seed_tasks.jsonl", "self_instruct", 175),
    ("self_instruct_user_oriented.jsonl", "self_instruct", 252),
])
def test_real_shared_sources_convert(shared_data, fname, fmt, rows):
    path = shared_data("sources", fname)
    loaded = load_source(SourceSpec(name=fname, format=fmt, path=str(path)))
    assert len(loaded.rows) == rows and str(path) in loaded.inputs["files"]
    out = list(convert(fmt, loaded.rows))
    good = [m for _, m in out if not isinstance(m, BadRow)]
    assert not [m for _, m in out if isinstance(m, BadRow)]
    assert len(good) >= rows  # self-instruct gives one example per instance
    checked = 0
    for msgs in good:
        try:
            v = validate_messages(msgs)
        except BadRow as e:
            assert e.reason == "empty_assistant_turn"  # the code-alpaca sample has 2 rows with an empty output
            continue
        assert v[-1]["role"] == "assistant" and v[0]["role"] in ("user", "system")
        checked += 1
    assert checked >= len(good) - 2
    if fname == "lima.json":
        assert max(len(m) for m in good) > 2  # multi-turn rows from `history`
    if fname.endswith(".jsonl"):
        assert loaded.rows[0][0].endswith(f"{fname}:1")
        first = json.loads(path.read_text().splitlines()[0])
        assert good[0][-1]["content"] == first["instances"][0]["output"]
