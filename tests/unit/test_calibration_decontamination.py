"""`zephyr eval calibrate` leaves out the questions a reported split holds: calibration questions (scored or read
back from saved scores) and the demonstrations: the same question with the same options (evals/calibrate.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from evals import calibration
from evals.calibrate import (
    CalibrationError,
    calibrate,
    contamination,
    demonstrations,
    draw_clean,
    left_out_note,
    load_items,
    load_scores,
    save_scores,
)
from zephyr import mcq
from zephyr.settings import Settings

# A reported (test) split: a short question and a long one.
SHORT = ("Who would be healthier?", ["a runner", "a smoker", "a sleeper", "a couch potato"])
LONG = ("A student pours vinegar on baking soda in a glass jar and sees many bubbles form quickly on the table.",
        ["a gas forms", "a solid melts", "light is made", "nothing happens"])


def _row(item_id: str, stem: str, options: list[str], key: int = 0) -> dict:
    return {"id": item_id, "answerKey": "ABCD"[key],
            "question": {"stem": stem, "choices": [{"label": label, "text": text}
                                                  for label, text in zip("ABCD", options, strict=True)]}}


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _data_dir(root: Path, test_split: bool = True) -> Path:
    """ARC-Easy only: a test split (the reported one), a dev split (calibration) with two questions the test split
    holds and one that only looks alike, and a train split (the demonstrations' pool)."""
    arc = root / "arc" / "ARC-Easy"
    if test_split:
        _write(arc / "ARC-Easy-Test.jsonl", [_row("t-short", *SHORT), _row("t-long", *LONG),
                                             _row("t-plain", "Which planet is closest to the Sun?",
                                                  ["Mercury", "Venus", "Mars", "Earth"])])
    dev = [_row(f"v{i}", f"What is {i} plus {i}?", [str(2 * i), str(i), str(i + 1), str(3 * i + 1)])
           for i in range(30)]
    dev[4] = _row("v-short", SHORT[0].upper(), list(reversed(SHORT[1])), 3)  # same question, options reordered
    dev[9] = _row("v-long", "Look: " + LONG[0].lower(), ["fizz", "foam", "ice", "smoke"])  # same text, other options
    dev[12] = _row("v-alike", SHORT[0], ["a baby", "a cat", "a dog", "a fish"])  # same short stem, other options
    _write(arc / "ARC-Easy-Dev.jsonl", dev)
    return root


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir)


def test_calibration_questions_a_reported_split_holds_are_left_out(tmp_path: Path):
    settings = _settings(_data_dir(tmp_path))
    data, left_out = load_items(settings, ["arc_easy"], None)
    split, items = data["arc_easy"]
    assert split == "validation" and len(items) == 29
    assert left_out == {"arc_easy": {"v-short": "arc_easy/t-short"}}
    # A stem alone is no match: with other options it carries no test question's label.
    assert {"v-alike", "v-long"} <= {i.id for i in items}
    check = contamination(settings)
    assert check.against == ["arc_easy"] and "mmlu" in check.missing
    note = left_out_note(check, left_out)
    assert "arc_easy 1" in note and "v-short = arc_easy/t-short" in note and "not checked against" in note
    # --limit takes the first questions, then leaves out those a reported split holds
    data, left_out = load_items(settings, ["arc_easy"], 6)
    assert [i.id for i in data["arc_easy"][1]] == ["v0", "v1", "v2", "v3", "v5"]
    assert left_out == {"arc_easy": {"v-short": "arc_easy/t-short"}}
    with pytest.raises(CalibrationError, match="unknown MCQ benchmark"):
        load_items(settings, ["nope"], None)


def _scored(ids: list[str], seed: int = 7) -> list[calibration.Scored]:
    rng = random.Random(seed)
    items = []
    for item_id in ids:
        cloze = [rng.gauss(-8, 2) for _ in range(4)]
        scores = dataclasses.replace(mcq.cloze_scores(["x" * 5] * 4, cloze), answer_prior=[rng.gauss(-6, 1)] * 4)
        items.append(calibration.Scored(scores, cloze.index(max(cloze)) if rng.random() < 0.6 else rng.randrange(4),
                                        item_id))
    return items


def _refit_home(data_dir: Path, tmp_path: Path, monkeypatch, default_model, name: str
                ) -> tuple[Settings, Path, list[str]]:
    """A registry entry `name` over `data_dir`, the folder its saved scores go in, and the ids of the data's dev
    split (v-short repeats a test question: a refit leaves it out)."""
    from loadtest.harness import linked_variant

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(data_dir))
    settings = Settings()
    linked_variant(settings.home, default_model, name)
    ids = [f"v{i}" for i in range(30)]
    ids[4], ids[9], ids[12] = "v-short", "v-long", "v-alike"
    return settings, settings.resolved_eval_results_dir / name / "calibration", ids


def test_a_refit_leaves_out_the_same_questions_from_scores_saved_before_the_rule(tmp_path: Path, monkeypatch,
                                                                                 default_model):
    from zephyr.registry import Registry

    settings, own, ids = _refit_home(_data_dir(tmp_path / "data"), tmp_path, monkeypatch, default_model, "decon-test")
    # A file from before the rule: every question scored, no "decontaminated" in it.
    old = save_scores(own / "old.json", {"arc_easy": "validation"}, {"arc_easy": _scored(ids)}, "Answer:")
    raw = json.loads(old.read_text())
    del raw["arc_easy"]["decontaminated"]
    old.write_text(json.dumps(raw))
    assert load_scores(old).decontaminated == {"arc_easy": 0}
    out = io.StringIO()
    record = calibrate("decon-test", settings, Console(file=out, width=200), scores=old)
    assert record.validation["decontaminated"] == {"arc_easy": 1}
    assert record.validation["splits"]["arc_easy"]["n"] == 29 and record.validation["n"] == 29
    assert "left out calibration questions a reported split holds: arc_easy 1" in out.getvalue()
    saved = Registry(settings.models_dir).get("decon-test").manifest.mcq_calibration
    assert saved.validation["decontaminated"] == {"arc_easy": 1}

    # A file the rule already cleaned (as a fresh run saves it) keeps its count and loses nothing more.
    clean = [i for i in ids if i != "v-short"]
    new = save_scores(own / "new.json", {"arc_easy": "validation"}, {"arc_easy": _scored(clean)}, "Answer:",
                      decontaminated={"arc_easy": 1})
    out = io.StringIO()
    record = calibrate("decon-test", settings, Console(file=out, width=200), scores=new, write=False)
    assert record.validation["decontaminated"] == {"arc_easy": 1} and record.validation["n"] == 29
    assert "(arc_easy 1 of them when scored)" in out.getvalue()

    # Scores of other weights of the name (an entry made again since; the results folder outlived it) are refused.
    revision = Registry(settings.models_dir).get("decon-test").manifest.revision
    ours = save_scores(own / "ours.json", {"arc_easy": "validation"}, {"arc_easy": _scored(clean)}, "Answer:",
                       decontaminated={"arc_easy": 1}, model_revision=revision)
    assert load_scores(ours).model_revision == revision
    assert calibrate("decon-test", settings, Console(file=io.StringIO()), scores=ours, write=False).validation
    theirs = save_scores(own / "theirs.json", {"arc_easy": "validation"}, {"arc_easy": _scored(clean)}, "Answer:",
                         decontaminated={"arc_easy": 1}, model_revision="made:2026-01-01T00:00:00+00:00")
    with pytest.raises(CalibrationError, match="scored other weights of decon-test"):
        calibrate("decon-test", settings, Console(file=io.StringIO()), scores=theirs, write=False)

    # Questions the folder's split lacks (or saved without ids) cannot be checked: refused, as is a missing split.
    stray = save_scores(own / "stray.json", {"arc_easy": "validation"}, {"arc_easy": _scored(ids + ["gone"])},
                        "Answer:")
    with pytest.raises(CalibrationError, match="1 arc_easy question.s. that arc_easy's validation split"):
        calibrate("decon-test", settings, Console(file=io.StringIO()), scores=stray, write=False)
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(CalibrationError, match="needs the questions the scores were made on"):
        calibrate("decon-test", Settings(), Console(file=io.StringIO()), scores=old, write=False)
    # An older record (no such field) still loads.
    older = {k: v for k, v in saved.validation.items() if k != "decontaminated"}
    assert mcq.MCQCalibration.model_validate(saved.model_dump() | {"validation": older}).validation == older


def _pool_dir(root: Path, contaminated_at: int | None, size: int = 30) -> Path:
    rows = [_row(f"p{i}", f"What is {i} + 1?", [str(i + 1), str(i), str(i + 2), str(i + 3)]) for i in range(size)]
    if contaminated_at is not None:
        rows[contaminated_at] = _row(f"p{contaminated_at}", *LONG)
    _write(root / "arc" / "ARC-Easy" / "ARC-Easy-Train.jsonl", rows)
    return root


def test_demonstrations_skip_a_drawn_question_a_reported_split_holds_and_keep_every_clean_draw(tmp_path: Path):
    count = 3
    hit = random.Random(0).sample(range(30), count)[1]  # the second demonstration seed 0 draws
    data_dir = _data_dir(_pool_dir(tmp_path, hit))
    _, source = demonstrations(_settings(data_dir), count)
    pool = [f"p{i}" for i in range(30)]
    assert source["skipped"] == [f"p{hit}"] and f"p{hit}" not in source["ids"] and len(source["ids"]) == count
    # the clean items of the same seed's next larger draw, in drawn order
    assert source["ids"] == [i for i in random.Random(0).sample(pool, count + 1) if i != f"p{hit}"][:count]

    # Without a reported split to match, the same pool gives the plain draw, and no "skipped" in the record.
    plain_dir = _data_dir(_pool_dir(tmp_path / "plain", hit), test_split=False)
    _, plain = demonstrations(_settings(plain_dir), count)
    assert plain["ids"] == random.Random(0).sample(pool, count) and "skipped" not in plain
    # A contaminated item the seed does not draw changes nothing either.
    counts = (1, 3, 5, 10, 16)
    drawn_ever = {i for n in counts for i in random.Random(0).sample(pool, n)}
    elsewhere = next(i for i in range(30) if f"p{i}" not in drawn_ever)
    other_dir = _data_dir(_pool_dir(tmp_path / "other", elsewhere))
    for n in counts:
        _, drawn = demonstrations(_settings(other_dir), n)
        assert drawn["ids"] == random.Random(0).sample(pool, n) and "skipped" not in drawn


def test_the_clean_draw_is_the_plain_draw_whenever_that_holds_nothing_flagged():
    pool = [dataclasses.make_dataclass("Item", ["id"])(f"i{n}") for n in range(200)]
    flagged = {f"i{n}" for n in range(0, 200, 7)}

    def match(item):
        return item.id in flagged

    for seed in range(20):
        for count in (1, 3, 5, 10, 16):
            plain = random.Random(seed).sample(pool, count)
            chosen, skipped = draw_clean(pool, count, seed, match)
            assert len(chosen) == count and not any(match(i) for i in chosen)
            if not any(match(i) for i in plain):
                assert chosen == plain and skipped == []
            else:
                assert skipped and all(i in flagged for i in skipped)
            assert draw_clean(pool, count, seed, match) == (chosen, skipped)  # deterministic
    with pytest.raises(CalibrationError, match="only 28 of the 200 demonstration candidates are clean"):
        draw_clean(pool, 29, 0, lambda item: int(item.id[1:]) >= 28)


def test_a_refit_checks_the_saved_demonstrations_and_leaves_out_impossible_scores(tmp_path: Path, monkeypatch,
                                                                                  default_model):
    data_dir = _data_dir(_pool_dir(tmp_path / "data", contaminated_at=5))  # p5 repeats a test question
    settings, own, ids = _refit_home(data_dir, tmp_path, monkeypatch, default_model, "demo-test")

    def saved(name: str, demonstration_ids: list[str], items: list[calibration.Scored] | None = None) -> Path:
        source = {"benchmark": "arc_easy", "split": "train", "seed": 0, "count": len(demonstration_ids),
                  "ids": demonstration_ids}
        return save_scores(own / name, {"arc_easy": "validation"}, {"arc_easy": items or _scored(ids)}, "Q?",
                           "Question: solved\nAnswer: yes\n\n", source)

    # Scored after a demonstration a test split holds (a file from before the draw was checked): refused.
    with pytest.raises(CalibrationError, match=r"demonstrations a reported split holds \(p5 = arc_easy/t-long\)"):
        calibrate("demo-test", settings, Console(file=io.StringIO()), scores=saved("a.json", ["p1", "p5"]),
                  write=False)
    with pytest.raises(CalibrationError, match="cannot be checked"):
        calibrate("demo-test", settings, Console(file=io.StringIO()), scores=saved("b.json", ["p1", "gone"]),
                  write=False)
    # Clean demonstrations refit; a question with an impossible option is left out, and said so.
    items = _scored(ids)
    items[3] = dataclasses.replace(items[3], scores=dataclasses.replace(
        items[3].scores, cloze=[float("-inf"), *items[3].scores.cloze[1:]]))
    out = io.StringIO()
    record = calibrate("demo-test", settings, Console(file=out, width=200), scores=saved("c.json", ["p1", "p2"], items),
                       write=False)
    assert record.validation["n"] == len(ids) - 2
    assert f"left out questions with a score that is not finite: arc_easy {items[3].id}" in out.getvalue()
    with pytest.raises(ValueError, match="not finite"):
        calibration.fit(items)
    # None left: a clear error, not a division by zero in the fit.
    hopeless = [dataclasses.replace(i, scores=dataclasses.replace(i.scores, cloze=[float("nan")] * len(i.scores.cloze)))
                for i in items]
    with pytest.raises(CalibrationError, match="no validation question is left to calibrate on"):
        calibrate("demo-test", settings, Console(file=io.StringIO()), scores=saved("d.json", ["p1", "p2"], hopeless),
                  write=False)


@pytest.mark.parametrize("damage", [{"gold": 4}, {"gold": "B"}, {"gold": True}, {"cloze": [-1.0, -2.0]}])
def test_a_damaged_scores_file_is_refused_with_what_to_do_not_a_traceback(tmp_path: Path, damage):
    """A hand-edited or foreign file's gold of 4 on a 4-option question reached the fit, whose IndexError the CLI
    showed as a traceback (found by a review)."""
    from evals.calibrate import CalibrationError

    path = save_scores(tmp_path / "scores.json", {"arc_easy": "validation"},
                       {"arc_easy": _scored(["q1", "q2", "q3"])}, "Answer:")
    raw = json.loads(path.read_text())
    raw["arc_easy"]["items"][1].update(damage)
    path.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="arc_easy item 'q2' has gold .* score again without --scores"):
        load_scores(path)
