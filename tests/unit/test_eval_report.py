"""The report over hand-made results: numbers, deltas, size ratios, one self-contained HTML file."""

from __future__ import annotations

import re

import pytest

from evals.report import write_report
from evals.results import EvalRun, ResultStore, measurement
from tests.unit.review_export import write_dpo_export
from zephyr.registry import MANIFEST, ModelManifest, Registry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def accuracy(correct: int, total: int = 100) -> dict[str, float]:
    return {f"q{i}": float(i < correct) for i in range(total)}


@pytest.fixture
def store(tmp_path) -> ResultStore:
    store = ResultStore(tmp_path / "results")
    subjects = {"stem": 0.5, "high_school_biology": 0.625, "<script>alert(1)</script>": 0.25}
    store.save(
        EvalRun(
            model="base",
            method="base",
            suite="mcq",
            size_bytes=400_000_000,
            measurements=[
                measurement("arc_easy", "letter_acc", "test", accuracy(52)),
                measurement("arc_easy", "cloze_acc", "test", accuracy(61)),
                measurement("mmlu", "letter_acc", "test", accuracy(50), groups=subjects),
            ],
        )
    )
    store.save(
        EvalRun(
            model="base",
            method="base",
            suite="text",
            measurements=[
                measurement("rm", "rm_score", "test", {"q1": 1.0, "q2": 2.0, "q3": 3.0, "q4": 4.0}),
            ],
        )
    )
    store.save(
        EvalRun(
            model="sft",
            parent="base",
            method="sft",
            suite="mcq",
            size_bytes=400_000_000,
            speed={"tok_per_s": {"1": 30.0, "8": 300.0}},
            measurements=[
                measurement("arc_easy", "letter_acc", "test", accuracy(60),
                            details={"answers": {f"q{i}": "A" for i in range(100)}}),
                measurement("arc_easy", "cloze_acc", "test", accuracy(58)),
            ],
        )
    )
    store.save(
        EvalRun(
            model="sft-gptq",
            parent="sft",
            method="gptq",
            suite="mcq",
            size_bytes=100_000_000,
            quantization={"quant_method": "gptq", "bits": 4, "group_size": 64},
            speed={"tok_per_s": {"1": 31.5, "8": 240.0}, "latency_p50_s": {"1": 0.25, "8": 1.5},
                   "ttft_p50_ms": {"1": 40.0}, "rss_peak_bytes": 2_000_000_000},
            measurements=[measurement("arc_easy", "letter_acc", "test", accuracy(57),
                                      details={"answers": {f"q{i}": "B" if i < 10 else "A" for i in range(100)}})],
        )
    )
    return store


@pytest.fixture
def report(store, tmp_path) -> tuple[str, str]:
    md, html = write_report(store, ["base", "sft", "sft-gptq", "ghost"], tmp_path / "out")
    assert md == tmp_path / "out" / "report.md" and html == tmp_path / "out" / "report.html"
    return md.read_text(), html.read_text()


def test_scores_with_intervals_per_benchmark(report):
    md, html = report
    for text in (md, html):
        assert re.search(r"52\.0 \[\d+\.\d, \d+\.\d\]", text)  # base arc_easy letter_acc with its CI
        assert "61.0" in text and "60.0" in text and "57.0" in text
    assert "### arc_easy" in md and "### mmlu" in md
    # base's newest run (text) recorded no size: the header takes it from the earlier mcq run.
    assert "| base | — | base | 400.0 MB |" in md


def test_delta_against_parent(report):
    md, html = report
    # sft - base on arc_easy letter_acc: 60 - 52 = +8.0 points; cloze 58 - 61 = -3.0; gptq - sft: 57 - 60 = -3.0.
    assert re.search(r"\| arc_easy \| letter_acc \| 100 \| 52\.0 \| 60\.0 \| \+8\.0 \[[-+]\d+\.\d, \+\d+\.\d\] \|", md)
    assert re.search(r"\| arc_easy \| cloze_acc \| 100 \| 61\.0 \| 58\.0 \| -3\.0 ", md)
    assert re.search(r"\| arc_easy \| letter_acc \| 100 \| 60\.0 \| 57\.0 \| -3\.0 ", md)
    assert "+8.0 [" in html


def test_a_variant_measured_on_other_questions_is_not_compared_with_its_parent(tmp_path):
    store = ResultStore(tmp_path / "results")
    for model, parent, digest in (("base", None, "aaaa"), ("sft", "base", "bbbb")):
        store.save(EvalRun(model=model, parent=parent, method=model, suite="mcq", data={"arc_easy": f"/{model}"},
                           measurements=[measurement("arc_easy", "cloze_acc", "test", accuracy(60),
                                                     data_digest={"arc_easy": digest})]))
    md = write_report(store, ["base", "sft"], tmp_path / "out")[0].read_text()
    assert "arc_easy/cloze_acc not compared: the two read different arc_easy items (candidate: /sft" in md
    assert "| arc_easy | cloze_acc | 100 |" not in md  # no delta row over different questions


def test_quantized_table_has_size_ratio_and_speed(report):
    md, _ = report
    section = md.split("## Quantized versus unquantized")[1].split("\n## ")[0]
    tables = section.split("\n\n")
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
    size = next(t for t in tables if "size vs parent" in t)
    size_rows = {line.split(" | ")[0].strip("| "): line for line in size.splitlines() if line.startswith("| ")}
    assert "0.25x" in size_rows["sft-gptq"] and "100.0 MB" in size_rows["sft-gptq"] and "1.00x" in size_rows["sft"]
    assert "gptq bits=4 group_size=64" in size_rows["sft-gptq"] and "2.0 GB" in size_rows["sft-gptq"]
    assert "90.0 (n=100)" in size_rows["sft-gptq"]  # the same letter as its parent on 90 of 100 questions
    speed = next(t for t in tables if "tok/s @8" in t)
    speed_rows = {line.split(" | ")[0].strip("| "): line for line in speed.splitlines() if line.startswith("| ")}
    # 31.5 / 30.0 = 1.05x at one request, 240 / 300 = 0.80x at eight; p50 latency 1.50 s at eight.
    assert re.search(r"31\.50 \| 1\.05x \| 0\.25", speed_rows["sft-gptq"])
    assert re.search(r"240 \| 0\.80x \| 1\.50", speed_rows["sft-gptq"]) and "40.00" in speed_rows["sft-gptq"]
    assert "base" not in rows  # base is no quantized model's parent
    assert "plots/quantized.png" in section


def test_mmlu_subjects_and_rm_distribution(report):
    md, _ = report
    assert re.search(r"\| stem \| 50\.0 \|", md) and re.search(r"\| high_school_biology \| 62\.5 \|", md)
    rm = md.split("## Reward-model scores")[1]
    # mean 2.5 [CI], median 2.5, std (ddof 1) 1.291, min 1, max 4
    assert re.search(r"\| base \| 4 \| 2\.500 \[\d\.\d{3}, \d\.\d{3}\] \| 2\.500 \| 1\.291 \| 1\.000 \| 4\.000 \|", rm)
    assert "plots/rm_scores.png" in rm


def test_html_is_self_contained_with_embedded_plots(report, tmp_path):
    _, html = report
    assert html.count('src="data:image/png;base64,') == 3  # accuracy bars, quantized speed/size, RM distribution
    assert 'src="http' not in html and "<link" not in html and "<script" not in html
    assert "<style>" in html
    for name in ("accuracy.png", "rm_scores.png"):
        assert (tmp_path / "out" / "plots" / name).read_bytes().startswith(PNG_MAGIC)


def test_text_from_results_is_escaped(report):
    md, html = report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>" not in md


def test_missing_models_are_listed_with_the_command(report):
    md, html = report
    assert "ghost: no results" in md
    assert "`zephyr eval run --model ghost --suite mcq`" in md
    assert "<code>zephyr eval run --model ghost --suite mcq</code>" in html
    # sft has no text suite while base has: the gap is named too.
    assert "sft: no text results. Run `zephyr eval run --model sft --suite text`" in md


def test_registry_supplies_parent_method_and_size(tmp_path):
    store = ResultStore(tmp_path / "results")
    store.save(EvalRun(model="p", suite="mcq", measurements=[measurement("sciq", "letter_acc", "test", accuracy(40))]))
    store.save(EvalRun(model="q", suite="mcq", measurements=[measurement("sciq", "letter_acc", "test", accuracy(45))]))
    for name, wrong in (("p", 5), ("q", 8)):  # a share where a rise is the worse news says so
        store.save(EvalRun(model=name, suite="text", measurements=[
            measurement("sciq_text", "names_distractor", "test", accuracy(wrong))]))
    registry = Registry(tmp_path / "models")
    for name, parent, method, weights in (("p", None, "sft", 3000), ("q", "p", "awq", 1000)):
        folder = registry.path_of(name)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * weights)
        (folder / MANIFEST).write_text(ModelManifest(name=name, parent=parent, method=method).model_dump_json())
    ratio = registry.get("q").size_bytes() / registry.get("p").size_bytes()
    md_path, _ = write_report(store, ["p", "q"], tmp_path / "out", registry=registry)
    md = md_path.read_text()
    assert "**q** (awq) vs its parent **p**" in md and "+5.0 [" in md
    assert "| sciq_text | names_distractor (lower is better) | 100 | 5.0 | 8.0 | +3.0 [" in md
    assert f"{ratio:.2f}x" in md.split("## Quantized versus unquantized")[1]


def test_reward_models_show_their_held_out_agreement_next_to_the_length_baseline(tmp_path):
    store = ResultStore(tmp_path / "results")
    store.save(EvalRun(model="p", suite="mcq", measurements=[measurement("sciq", "letter_acc", "test", accuracy(40))]))
    registry = Registry(tmp_path / "models")
    for name, method in (("p", "sft"), ("p-rm", "rm"), ("p-rm-old", "rm"), ("p-rm-swept", "rm")):
        folder = registry.path_of(name)
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(ModelManifest(name=name, method=method).model_dump_json())
    registry.record_eval("p-rm", "heldout_agreement", {"n": 350, "agreement": 0.65, "ci95": [0.6, 0.7],
                                                       "longer_answer": 0.58, "longer_answer_ci95": [0.53, 0.63]})
    registry.record_eval("p-rm-swept", "heldout_agreement", {"n": 300, "agreement": 0.66, "ci95": [0.6, 0.7],
                                                             "longer_answer": 0.5, "longer_answer_ci95": [0.4, 0.6],
                                                             "shorter_chosen": {"n": 120, "agreement": 0.55,
                                                                                "ci95": [0.46, 0.64]}})
    registry.record_eval("p-rm-swept", "validation_agreement", {"n": 200, "agreement": 0.7, "ci95": [0.63, 0.76],
                                                                "longer_answer": 0.5, "longer_answer_ci95": [0.4, 0.6]})
    md = write_report(store, ["p"], tmp_path / "out", registry=registry)[0].read_text()
    section = md.split("## Reward models: agreement with held-out human preferences")[1].split("\n## ")[0]
    assert "| p-rm | 350 | 65.0 [60.0, 70.0] | 58.0 [53.0, 63.0] | — | — |" in section  # recorded before either
    assert ("| p-rm-swept | 300 | 66.0 [60.0, 70.0] | 50.0 [40.0, 60.0] | 55.0 [46.0, 64.0] (120) "
            "| 70.0 [63.0, 76.0] (200) |") in section
    assert "p-rm-old" not in section  # no measurement, no row
    assert "Reward models" not in write_report(store, ["p"], tmp_path / "out2")[0].read_text()


def test_models_without_any_results_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="no results for a, b: check the name, or run `zephyr eval run"):
        write_report(ResultStore(tmp_path / "none"), ["a", "b"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # A registry model with no runs yet is reported, with what to run: only a name nothing knows is refused.
    registry = Registry(tmp_path / "models")
    folder = registry.models_dir / "known"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(ModelManifest(name="known", method="sft").model_dump_json())
    md, _ = write_report(ResultStore(tmp_path / "none"), ["known"], tmp_path / "out", registry=registry)
    assert "known: no results" in md.read_text()
    with pytest.raises(ValueError, match="no results for typo and no such registry model"):
        write_report(ResultStore(tmp_path / "none"), ["known", "typo"], tmp_path / "out", registry=registry)
    with pytest.raises(ValueError, match="at least one model"):
        write_report(ResultStore(tmp_path / "none"), [], tmp_path / "out")


def test_stale_plots_are_removed(store, tmp_path):
    out = tmp_path / "out"
    write_report(store, ["base"], out)
    assert (out / "plots" / "rm_scores.png").exists()
    write_report(store, ["sft"], out)  # no RM scores for sft
    assert not (out / "plots" / "rm_scores.png").exists()


def rm_store(tmp_path) -> ResultStore:
    store = ResultStore(tmp_path / "results")
    scores = {
        "zeta": {"q1": 1.0, "q2": 0.5, "q3": -1.0, "q4": 2.0, "only_zeta": 9.0},
        "alpha": {"q1": 0.0, "q2": 0.5, "q3": 0.0, "q4": 1.0, "only_alpha": -9.0},
        "other": {"x1": 1.0},  # no question in common with the others: no row
    }
    for model, items in scores.items():
        store.save(EvalRun(model=model, suite="text", measurements=[measurement("rm", "rm_score", "test", items)]))
    return store


def test_reward_model_win_rates_per_pair_ordered_by_name(tmp_path):
    md_path, html_path = write_report(rm_store(tmp_path), ["zeta", "alpha", "other"], tmp_path / "out")
    md, html = md_path.read_text(), html_path.read_text()
    section = md.split("## Reward-model win rates")[1].split("\n## ")[0]
    # alpha vs zeta on q1..q4: alpha wins q3, zeta wins q1 and q4, q2 is a tie -> (1 + 0.5) / 4 = 37.5%.
    assert "| alpha | zeta | 4 | 1 | 2 | 1 | 37.5 [9.2, 78.1] |" in section  # Wilson over 1.5 of 4
    assert "other" not in section
    assert "Reward-model win rates</h2>" in html and "<td>alpha</td><td>zeta</td>" in html


def test_reward_model_scores_of_other_questions_under_the_same_ids_have_no_win_rate(tmp_path):
    """SciQ's ids are row numbers: two runs on different SciQ files pair different questions under one id."""
    store = ResultStore(tmp_path / "results")
    for model, digest in (("alpha", "aaaa"), ("zeta", "bbbb")):
        m = measurement("rm", "rm_score", "test", {"q1": 1.0, "q2": 0.5}, data_digest={"sciq": digest})
        store.save(EvalRun(model=model, suite="text", measurements=[m]))
    md_path, _ = write_report(store, ["alpha", "zeta"], tmp_path / "out")
    assert "## Reward-model win rates" not in md_path.read_text()


def test_one_reward_model_score_has_no_win_rates(report):
    md, _ = report
    assert "## Reward-model win rates" not in md


def review_export(tmp_path):
    """A DPO export written by the real exporter (as in test_eval_preference.py) from hand-made verdicts."""
    cases = [  # (served model, candidate model, candidate variant, labels by reviewers)
        ("tutor-a", "<b>tutor-b</b>", None, ["served"]),
        ("tutor-a", "<b>tutor-b</b>", None, ["candidate", "candidate"]),
        ("<b>tutor-b</b>", "tutor-a", None, ["served"]),
        ("tutor-a", "tutor-a", "T=1", ["candidate"]),
        ("tutor-a", "<b>tutor-b</b>", None, ["tie"]),  # not a DPO pair
    ]
    path, count = write_dpo_export(tmp_path / "dpo.jsonl", cases)
    assert count == 4
    return path


def test_human_review_win_rates(store, tmp_path):
    md_path, html_path = write_report(store, ["base"], tmp_path / "out", reviews=review_export(tmp_path))
    md, html = md_path.read_text(), html_path.read_text()
    section = md.split("## Human review win rates")[1].split("\n## ")[0]
    assert "4 human preference pairs" in section
    # Served won items 0 and 2, the candidate items 1 and 3: 2 of 4, Wilson [15.0, 85.0].
    assert "the served answer won 2 of 4 pairs, the candidate 2; served win rate 50.0 [15.0, 85.0]" in section
    # Per model: tutor-a won 1 of 4, tutor-b 2 of 3, the resampled tutor-a 1 of 1.
    assert "| tutor-a | 1 | 3 | 4 | 25.0 [4.6, 69.9] |" in section
    assert "| &lt;b&gt;tutor-b&lt;/b&gt; | 2 | 1 | 3 | 66.7 [20.8, 93.9] |" in section
    assert "| tutor-a [T=1] | 1 | 0 | 1 | 100.0 [20.7, 100.0] |" in section
    # Head to head, names sorted: <b>tutor-b</b> beat tutor-a 2 to 1; the resample beat tutor-a once.
    # No model has reward-model scores: the RM column shows none.
    assert "| &lt;b&gt;tutor-b&lt;/b&gt; | tutor-a | 3 | 2 | 1 | 66.7 [20.8, 93.9] | — |" in section
    assert "| tutor-a | tutor-a [T=1] | 1 | 0 | 1 | 0.0 [0.0, 79.3] | — |" in section
    assert "Human review win rates</h2>" in html and "<code>dpo.jsonl</code>" in html
    assert "<td>&lt;b&gt;tutor-b&lt;/b&gt;</td>" in html and "<b>tutor-b</b>" not in html
    assert "50.0 [15.0, 85.0]" in html


def test_human_and_reward_model_win_rates_side_by_side(tmp_path):
    cases = [("alpha", "zeta", None, ["served"]), ("zeta", "alpha", None, ["candidate"]),
             ("alpha", "zeta", None, ["candidate"])]
    path, _ = write_dpo_export(tmp_path / "dpo.jsonl", cases)
    md_path, _ = write_report(rm_store(tmp_path), ["alpha", "zeta"], tmp_path / "out", reviews=path)
    section = md_path.read_text().split("## Human review win rates")[1].split("\n## ")[0]
    # Reviewers: alpha won 2 of 3 against zeta; the reward model: alpha 37.5% over their 4 common questions, with
    # the same Wilson interval as the reward-model win-rate table.
    assert "| alpha | zeta | 3 | 2 | 1 | 66.7 [20.8, 93.9] | 37.5 [9.2, 78.1] (n 4) |" in section


def test_pairs_answered_before_a_model_was_remade_are_left_out_and_counted(tmp_path, default_model):
    from datetime import UTC, datetime

    from zephyr.registry import ModelManifest, Registry

    cases = [("alpha", "zeta", None, ["served"]), ("zeta", "alpha", None, ["candidate"]),  # 9:00 and 9:01
             ("alpha", "zeta", None, ["candidate"])]  # 9:02
    path, _ = write_dpo_export(tmp_path / "dpo.jsonl", cases)
    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="alpha", method="dpo",
                                                   created_at=datetime(2026, 11, 1, 9, 1, 30, tzinfo=UTC)))
    md_path, _ = write_report(rm_store(tmp_path), ["alpha", "zeta"], tmp_path / "out", registry=registry,
                              reviews=path)
    section = md_path.read_text().split("## Human review win rates")[1].split("\n## ")[0]
    assert "1 human preference pairs" in section and "2 pairs are left out: other weights" in section
    assert "| alpha | zeta | 1 | 0 | 1 | 0.0 [0.0, 79.3] |" in section


def test_missing_or_bad_reviews_file(store, tmp_path):
    with pytest.raises(ValueError, match=r"reviews file .*absent\.jsonl does not exist"):
        write_report(store, ["base"], tmp_path / "out", reviews=tmp_path / "absent.jsonl")
    assert not (tmp_path / "out").exists()  # nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="JSON Lines"):
        write_report(store, ["base"], tmp_path / "out", reviews=bad)


def test_cli_report_with_a_missing_reviews_file(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["eval", "report", "--models", "m", "--out", str(tmp_path / "out"),
                                      "--reviews", str(tmp_path / "absent.jsonl")])
    assert result.exit_code == 1, result.output
    assert "error: reviews file" in result.output and "does not exist" in " ".join(result.output.split())
    assert isinstance(result.exception, SystemExit)  # typer.Exit(1), not a traceback


def test_speed_ratio_only_within_one_session(tmp_path):
    # The parent and one child served in one loadtest.variants session, another child in a later session.
    store = ResultStore(tmp_path / "results")
    served = [("base", None, "base", 20.0, "s1"), ("base-w8a8", "base", "w8a8", 30.0, "s1"),
              ("base-awq", "base", "awq", 15.0, "s2")]
    for model, parent, method, tok, session in served:
        store.save(EvalRun(model=model, parent=parent, method=method, suite="speed", size_bytes=100,
                           speed={"tok_per_s": {"1": tok}, "session": session}))
    md = write_report(store, ["base", "base-w8a8", "base-awq"], tmp_path / "out")[0].read_text()
    speed = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if "tok/s" not in line
             and line.startswith("| base")}
    assert re.search(r"30\.00 \| 1\.50x", speed["base-w8a8"])
    assert re.search(r"15\.00 \| — ", speed["base-awq"])  # measured against another session's parent: no ratio


def test_served_method_calibration_section_and_reliability_plot(tmp_path):
    from evals import calibration

    store = ResultStore(tmp_path / "results")
    probabilities = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]]
    gold = [0, 1, 1, 0]
    figures = calibration.summarize(probabilities, gold)
    store.save(EvalRun(model="base", suite="mcq", measurements=[measurement(
        "arc_easy", "mcq_acc_auto", "test", {f"q{i}": float(i != 1) for i in range(4)},
        details={"method": "combined", "calibrated": True,
                 "calibration": {k: v for k, v in figures.items() if k not in ("n", "accuracy")}})]))
    md_path, _ = write_report(store, ["base"], tmp_path / "report")
    text = md_path.read_text()
    section = text[text.index("## Confidence and calibration"):]
    assert "| base | arc_easy | test | 4 | combined | yes | 75.0 |" in section
    assert f"{figures['ece']:.3f}" in section and f"{figures['brier']:.3f}" in section
    assert (tmp_path / "report" / "plots" / "calibration.png").read_bytes().startswith(PNG_MAGIC)


def test_served_figures_of_a_record_since_replaced_are_marked_stale(tmp_path, default_model):
    from datetime import UTC, datetime

    from evals import calibration
    from zephyr.mcq import MCQCalibration

    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="base", method="sft"))
    record = MCQCalibration(method="cloze", weights={"cloze": 2.0}, created_at=datetime(2026, 12, 1, tzinfo=UTC))
    registry.record_calibration("base", record)
    store = ResultStore(tmp_path / "results", registry)
    figures = calibration.summarize([[0.9, 0.1], [0.3, 0.7]], [0, 1])
    store.save(EvalRun(model="base", suite="mcq", measurements=[measurement(
        "arc_easy", "mcq_acc_auto", "test", {"q0": 1.0, "q1": 1.0},
        details={"method": "cloze", "calibrated": True, "record_created_at": record.created_at.isoformat(),
                 "calibration": {k: v for k, v in figures.items() if k not in ("n", "accuracy")}})]))

    def section() -> str:
        text = write_report(store, ["base"], tmp_path / "report", registry=registry)[0].read_text()
        return text[text.index("## Confidence and calibration"):]

    assert "| base | arc_easy | test | 2 | cloze | yes |" in section() and "Stale" not in section()
    registry.record_calibration("base", record.model_copy(update={"created_at": datetime(2026, 12, 4, tzinfo=UTC)}))
    assert "| base | arc_easy | test | 2 | cloze (stale) | yes |" in section()
    assert "**Stale:** the rows marked (stale) were measured under another /mcq calibration record" in section()
    assert "`zephyr eval run --model base --suite mcq`" in section()


def test_the_models_table_gives_each_suites_question_limit_not_the_newest_runs(tmp_path):
    store = ResultStore(tmp_path / "results")
    store.save(EvalRun(model="p", suite="mcq", measurements=[measurement("sciq", "letter_acc", "test", accuracy(40))]))
    store.save(EvalRun(model="p", suite="text", limit=300, measurements=[
        measurement("sciq_text", "names_distractor", "test", accuracy(5, 300))]))
    store.save(EvalRun(model="q", suite="mcq", measurements=[measurement("sciq", "letter_acc", "test", accuracy(45))]))
    # a smaller smoke run after the whole one does not replace it (chosen_sources), so it sets no limit either
    store.save(EvalRun(model="q", suite="mcq", limit=40, measurements=[
        measurement("sciq", "letter_acc", "test", accuracy(20, 40))]))
    md = write_report(store, ["p", "q"], tmp_path / "out")[0].read_text()
    models = md.split("## Models")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in models.splitlines()
            if line.startswith(("| p |", "| q |"))}
    assert rows["p"].endswith("| mcq: whole; text: first 300 |")
    assert rows["q"].endswith("| whole splits |")


def test_a_rerun_on_other_data_replaces_a_larger_run_on_the_old_data(tmp_path):
    """A larger run on other data (a hub copy's 14,042 MMLU questions) hid every later run on the local split: the
    gate kept refusing "re-run on the same data", and the rerun changed nothing. The newest run's data decides; on
    it, the largest run wins as before, and the manifest's summary is the merged view's, not the last run's."""
    from datetime import UTC, datetime, timedelta

    store = ResultStore(tmp_path / "results")
    start = datetime(2026, 12, 1, tzinfo=UTC)

    def run(hours, correct, total, data):
        m = measurement("mmlu", "letter_acc", "test", accuracy(correct, total)).model_copy(
            update={"data_digest": {"mmlu": data}})
        return store.save(EvalRun(model="m", suite="mcq", created_at=start + timedelta(hours=hours), measurements=[m]))

    run(0, 60, 120, "hub")
    local = run(1, 50, 100, "local")
    assert store.latest("m").get("mmlu/letter_acc").data_digest == {"mmlu": "local"}
    run(2, 30, 40, "local")  # a smoke run on the same data does not replace the whole split
    assert store.latest("m").get("mmlu/letter_acc").n == 100
    assert store.chosen_summary("m", {"mmlu/letter_acc"}) == {"mmlu/letter_acc": {
        "score": 0.5, "n": 100, "split": "test", "at": (start + timedelta(hours=1)).isoformat(), "run": str(local)}}
    assert store.chosen_summary("m", {"other/key"}) == {}
    # a run saved before digests were recorded names no data: taken on trust, so a later smoke run does not replace it
    older = ResultStore(tmp_path / "older")
    older.save(EvalRun(model="m", suite="mcq", created_at=start, measurements=[
        measurement("mmlu", "letter_acc", "test", accuracy(50, 100))]))
    older.save(EvalRun(model="m", suite="mcq", created_at=start + timedelta(hours=1), measurements=[
        measurement("mmlu", "letter_acc", "test", accuracy(20, 40)).model_copy(update={
            "data_digest": {"mmlu": "local"}})]))
    assert older.latest("m").get("mmlu/letter_acc").n == 100
    # a newest run without a digest does not make every older run count: the newest digest named still decides
    older.save(EvalRun(model="m", suite="mcq", created_at=start + timedelta(hours=2), measurements=[
        measurement("mmlu", "letter_acc", "test", accuracy(5, 10))]))
    newer_data = ResultStore(tmp_path / "newer")
    for hours, total, data in ((0, 120, {"mmlu": "hub"}), (1, 100, {"mmlu": "local"}), (2, 10, {})):
        newer_data.save(EvalRun(model="m", suite="mcq", created_at=start + timedelta(hours=hours), measurements=[
            measurement("mmlu", "letter_acc", "test", accuracy(total // 2, total)).model_copy(update={
                "data_digest": data})]))
    assert newer_data.latest("m").get("mmlu/letter_acc").data_digest == {"mmlu": "local"}


def test_a_run_with_an_empty_or_nan_measurement_reads_back_and_reports(tmp_path):
    """An empty measurement scores NaN: it was written as null, which the reader refused, dropping the whole run."""
    import json
    import math

    store = ResultStore(tmp_path / "results")
    path = store.save(EvalRun(model="base", method="base", suite="text", measurements=[
        measurement("gsm8k_text", "looping", "test", accuracy(3, 10)),
        measurement("sciq_text", "looping", "test", {}),
        measurement("sciq", "rm_score", "test", {"q0": float("nan"), "q1": 0.5}),
        measurement("rm", "rm_score", "test", {"q0": float("nan"), "q1": 0.5, "q2": 0.7}),
    ]))
    [run] = store.runs("base")
    empty, scored = run.measurements[1], run.measurements[2]
    assert run.measurements[0].score == 0.3 and math.isnan(empty.score) and empty.n == 0
    assert math.isnan(scored.items["q0"]) and scored.items["q1"] == 0.5

    saved = json.loads(path.read_text())  # as an older version wrote it
    saved["measurements"][1]["score"] = None
    saved["measurements"][2]["items"]["q0"] = None
    path.write_text(json.dumps(saved))
    [run] = store.runs("base")
    assert math.isnan(run.measurements[1].score) and math.isnan(run.measurements[2].items["q0"])

    out = tmp_path / "report"
    write_report(store, ["base"], out)
    assert "gsm8k_text" in (out / "report.md").read_text()
    # the reward model's section reads the scores that are numbers (its histogram failed on NaN: no report at all)
    assert "## Reward-model scores" in (out / "report.md").read_text() and (out / "plots" / "rm_scores.png").is_file()


def test_mmlu_subjects_show_the_served_method_first(tmp_path):
    store = ResultStore(tmp_path / "results")
    store.save(EvalRun(model="base", method="base", suite="mcq", measurements=[
        measurement("mmlu", "letter_acc", "test", accuracy(25), groups={"stem": 0.25}),
        measurement("mmlu", "mcq_acc_auto", "test", accuracy(31), groups={"stem": 0.375}),
    ]))
    md, _ = write_report(store, ["base"], tmp_path / "report")
    subjects = md.read_text().split("## MMLU per subject")[1]
    assert re.search(r"\| stem \| 37\.5 \|", subjects) and "mcq_acc_auto in %" in subjects


def test_cli_report_on_models_without_any_result_fails_and_writes_nothing(tmp_path, monkeypatch):
    """A mistyped name in CI wrote a report of "no results" and exited 0; a folder as --reviews was "missing"."""
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["eval", "report", "--models", "typo,other", "--out", str(tmp_path / "out")])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "no results for typo, other and no such registry model" in said, said
    assert not (tmp_path / "out").exists()
    folder = CliRunner().invoke(app, ["eval", "report", "--models", "m", "--reviews", str(tmp_path)])
    assert folder.exit_code == 2 and "directory" in folder.output, folder.output


def test_reward_model_scores_with_no_number_in_common_leave_the_win_rates_out_not_the_report(tmp_path):
    """Two models whose shared items are all NaN on one side (a run saved before such scores were left out): the
    win-rate row failed the whole report with "no common item ids"."""
    store = ResultStore(tmp_path / "results")
    for name, value in (("a", float("nan")), ("b", 1.0)):
        store.save(EvalRun(model=name, suite="text", measurements=[
            measurement("rm", "rm_score", "test", {"q0": value, **({"q1": 0.5} if name == "a" else {})})]))
    md = write_report(store, ["a", "b"], tmp_path / "out")[0].read_text()
    assert "## Reward-model scores" in md and "## Reward-model win rates" not in md
