"""Benchmark loaders on small files in each data set's original format (never the shared data)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from offline import benchmarks
from offline.benchmarks import DatasetError, load


def write_arc(path: Path, rows: list[tuple[str, list[str], str, list[str] | None]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for qid, options, key, labels in rows:
            labels = labels or list("ABCDE"[: len(options)])
            choices = [{"label": lb, "text": t} for lb, t in zip(labels, options, strict=True)]
            record = {"id": qid, "answerKey": key, "question": {"stem": f"Question {qid}?", "choices": choices}}
            handle.write(json.dumps(record) + "\n")
    return path


def test_a_fingerprint_names_the_questions_not_the_path(tmp_path):
    rows = [("q1", ["red", "blue"], "A", None), ("q2", ["one", "two"], "B", None)]
    here, there = write_arc(tmp_path / "a.jsonl", rows), write_arc(tmp_path / "copy/b.jsonl", rows)
    def digest(path: Path) -> str:
        return benchmarks.fingerprint(load("arc_easy", source=path))

    assert digest(here) == digest(there)
    reordered = write_arc(tmp_path / "reordered.jsonl", rows[::-1])  # items are paired by id, not by row
    assert digest(reordered) == digest(here)
    changed = write_arc(tmp_path / "changed.jsonl", [rows[0], ("q2", ["one", "two"], "A", None)])  # a new key
    assert digest(changed) != digest(here)
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "1+1?", "answer": "one and one\n#### 2"}) + "\n")
    assert len(benchmarks.fingerprint(load("gsm8k", source=gsm8k))) == 16


def test_arc_letters_and_digit_labels(tmp_path):
    path = write_arc(tmp_path / "arc.jsonl", [
        ("q1", ["red", "blue", "green", "white"], "C", None),
        ("q2", ["one", "two", "three"], "2", ["1", "2", "3"]),
        ("q3", ["up", "up ", "down", "left"], "A", None),  # duplicate options are kept: benchmarks score whole
    ])
    items = load("arc_easy", source=path)
    assert [i.answer for i in items] == ["C", "B", "A"]
    assert items[1].options == ["one", "two", "three"]
    assert items[2].options == ["up", "up", "down", "left"]


def test_local_layout_and_limit(tmp_path):
    write_arc(tmp_path / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl",
              [(f"q{i}", ["a", "b"], "A", None) for i in range(5)])
    assert len(load("arc_challenge", data_dir=tmp_path)) == 5
    assert [i.id for i in load("arc_challenge", data_dir=tmp_path, limit=2)] == ["q0", "q1"]


def test_mmlu_subjects_stem_and_round_robin_limit(tmp_path):
    folder = tmp_path / "mmlu" / "test"
    folder.mkdir(parents=True)
    for subject, key in (("anatomy", "A"), ("college_physics", "D"), ("world_religions", "B")):
        with (folder / f"{subject}_test.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            for n in range(3):
                writer.writerow([f"{subject} question {n}, with a comma", "w", "x", "y", "z", key])
    items = load("mmlu", data_dir=tmp_path)
    assert len(items) == 9 and items[0].question == "anatomy question 0, with a comma"
    assert {i.subject: i.answer for i in items} == {"anatomy": "A", "college_physics": "D", "world_religions": "B"}
    limited = load("mmlu", data_dir=tmp_path, limit=4)
    assert Counter(i.subject for i in limited) == {"anatomy": 2, "college_physics": 1, "world_religions": 1}
    assert "college_physics" in benchmarks.MMLU_STEM and "world_religions" not in benchmarks.MMLU_STEM


def test_sciq_shuffles_the_key_per_question_and_reproducibly(tmp_path):
    rows = [{"question": f"What is {i}?", "correct_answer": f"right {i}", "distractor1": f"w1 {i}",
             "distractor2": f"w2 {i}", "distractor3": f"w3 {i}", "support": f"Support {i}."} for i in range(40)]
    (tmp_path / "sciq.json").write_text(json.dumps(rows))
    items = load("sciq", source=tmp_path / "sciq.json")
    assert all(i.options["ABCD".index(i.answer)] == f"right {n}" for n, i in enumerate(items))
    assert len({i.answer for i in items}) == 4  # not always the same letter
    assert items == load("sciq", source=tmp_path / "sciq.json")
    assert items[3].support == "Support 3."


def test_openbookqa_tsv(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
                    "7-1\tGas can fill\t(A) a box (B) any container (C) nothing (D) a cup\tx\tB\n")
    (item,) = load("openbookqa", source=path)
    assert item.options == ["a box", "any container", "nothing", "a cup"] and item.answer == "B"


def test_gsm8k_final_answer_and_solution(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,004"}) + "\n")
    (item,) = load("gsm8k", source=path)
    assert item.answer == "1004" and item.solution == "2 + 2 = <<2+2=4>>4"


def test_hub_rows_convert_like_local_files():
    arc = benchmarks.hub_arc([{"id": "x", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                             "answerKey": "B"}], "test")
    mmlu = benchmarks.hub_mmlu([{"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"],
                               "answer": 2}], "test")
    obqa = benchmarks.hub_openbookqa([{"id": "o", "question_stem": "Q", "choices": {"text": list("abcd"),
                                                                                  "label": list("ABCD")},
                                     "answerKey": "D"}], "validation")
    assert (arc[0].answer, mmlu[0].answer, mmlu[0].id, obqa[0].answer) == ("B", "C", "anatomy-test-0", "D")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "hellaswag"}, "unknown benchmark"),
    ({"name": "openbookqa", "split": "test"}, "no local 'test' split"),
    ({"name": "arc_easy", "source": "not a hub name"}, "does not exist"),
])
def test_bad_requests_name_the_problem(tmp_path, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        load(data_dir=tmp_path, **kwargs)


def test_a_folder_where_a_file_belongs_is_named(tmp_path):
    (tmp_path / "sciq").mkdir()
    with pytest.raises(DatasetError, match="cannot read .*sciq as sciq data .*give a file"):
        load("sciq", source=tmp_path / "sciq")


def test_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(DatasetError, match="ZEPHYR_DATA_DIR"):
        load("arc_easy", data_dir=tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"question": "no choices"}\n')
    with pytest.raises(DatasetError, match="not in arc_easy's format"):
        load("arc_easy", source=tmp_path / "bad.jsonl")


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused_not_read_as_all_or_as_a_slice(limit):
    with pytest.raises(ValueError, match="at least 1"):
        benchmarks.first([1, 2, 3], limit)
    assert benchmarks.first([1, 2, 3], None) == [1, 2, 3] and benchmarks.first([1, 2, 3], 2) == [1, 2]


@pytest.mark.parametrize(("name", "text"), [
    ("openbookqa", "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n7-1\tGas\t(A) a (B) b (C) c (D) d\n"),
    ("gsm8k", json.dumps({"question": "q", "answer": 42}) + "\n"),
    ("gsm8k", json.dumps({"question": "q", "answer": "It is 5"}) + "\n"),  # no "####": no final answer
    ("arc_easy", json.dumps({"id": "x", "answerKey": "A", "question": {"stem": None, "choices": [
        {"label": "A", "text": "a"}, {"label": "B", "text": "b"}]}}) + "\n"),
    ("sciq", json.dumps([{"question": 5, "correct_answer": "a", "distractor1": "b", "distractor2": "c",
                          "distractor3": "d"}])),
    ("openbookqa", "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n" + "x" * 200_000 + "\n"),
])
def test_a_file_of_another_shape_is_a_dataset_error_not_a_traceback(tmp_path, name, text):
    """A truncated TSV row, a number or null where text belongs, a field past csv's limit: tracebacks."""
    path = tmp_path / ("data.tsv" if name == "openbookqa" else "data.json")
    path.write_text(text)
    with pytest.raises(DatasetError, match=f"not in {name}'s format"):
        load(name, source=path)


def test_mmlu_takes_a_trailing_blank_line_and_obqa_skips_a_letter_given_twice(tmp_path):
    (tmp_path / "anatomy_test.csv").write_text("Q?,a,b,c,d,B\n\n")
    (item,) = load("mmlu", source=tmp_path)
    assert item.answer == "B"
    path = tmp_path / "dev.tsv"  # the local train split's 12-1145: "(D) ... (D) ...", no C
    path.write_text("ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
                    "1\tQ\t(A) a (B) b (D) c (D) d\tx\tA\n2\tQ\t(A) a (B) b (C) c (D) d\tx\tA\n")
    assert [i.id for i in load("openbookqa", source=path)] == ["2"]


def test_a_mistyped_path_is_named_missing_not_asked_of_the_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the hub"))
    for source in ("nodir/test.json", "data/ARC-Easy-Test.jsonl", str(tmp_path / "missing.jsonl")):
        with pytest.raises(DatasetError, match="does not exist"):
            load("sciq", source=source)
    (tmp_path / "arc").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load("arc_easy", source="arc/ARC-Easy")


def test_hub_rows_of_another_shape_or_none_are_a_dataset_error(monkeypatch):
    import datasets

    for rows, message in (([{"question": "q"}], "not in arc_easy's format"), ([], "holds no arc_easy items")):
        monkeypatch.setattr(datasets, "load_dataset", lambda *a, rows=rows, **k: rows)
        with pytest.raises(DatasetError, match=message):
            load("arc_easy", source="allenai/sciq")


def test_an_id_held_twice_is_a_dataset_error(tmp_path):
    """Scores are kept by item id: a file repeating one merged the two questions, one answered with the other's
    option scores, and n shrank without a word (found by a review)."""
    rows = [("dup", ["red", "blue"], "A", None), ("dup", ["one", "two"], "B", None), ("q3", ["x", "y"], "A", None)]
    with pytest.raises(DatasetError, match="holds the arc_easy item id 'dup' twice; ids must be unique"):
        load("arc_easy", source=write_arc(tmp_path / "a.jsonl", rows))
