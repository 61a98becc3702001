"""The regression gate over hand-made results: verdicts, common items only, clear errors."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from rich.console import Console

from evals.gate import GateError, check, compare_runs
from evals.results import EvalRun, Measurement, ResultStore, data_read, measurement
from offline.engine import IN_PROCESS


def accuracy(correct: int, total: int, prefix: str = "q") -> dict[str, float]:
    return {f"{prefix}{i}": float(i < correct) for i in range(total)}


def save(store: ResultStore, model: str, suite: str = "mcq", split: str = "test", **keys: dict[str, float]) -> None:
    """keys: benchmark__metric=items."""
    ms = [measurement(*key.split("__"), split, items) for key, items in keys.items()]
    store.save(EvalRun(model=model, suite=suite, measurements=ms))


@pytest.fixture
def store(tmp_path) -> ResultStore:
    return ResultStore(tmp_path / "results")


def render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_fails_when_the_candidate_drops_more_than_max_drop(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(50, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=None)
    assert not result.passed
    (row,) = result.rows
    assert (row.n, row.baseline, row.candidate, row.delta) == (100, 60.0, 50.0, pytest.approx(-10.0))
    assert row.low < row.delta < row.high
    text = render(result.table())
    assert "FAIL" in text and "-10.0" in text and "60.0" in text and "50.0" in text


@pytest.mark.parametrize(
    ("base", "cand", "max_drop"), [(60, 59, 1.0), (52, 51, 1.0), (60, 60, 0.0), (60, 70, 0.0), (60, 55, 5.0)]
)
def test_passes_within_max_drop_or_better(store, base, cand, max_drop):
    # A drop of exactly max_drop passes, although 0.51 - 0.52 is a hair below -0.01 in floating point.
    save(store, "base", arc_easy__letter_acc=accuracy(base, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(cand, 100))
    result = check(store, "cand", "base", max_drop=max_drop, suites=None)
    assert result.passed and result.rows[0].passed
    assert "PASS" in render(result.table())


def test_with_a_margin_a_row_fails_when_its_interval_reaches_a_drop_beyond_it(store):
    """Issue 28's rule, "no benchmark may drop significantly: the lower bound stays above -2": a point estimate within
    max_drop passes alone, but 200 items cannot rule out a drop of several points."""
    save(store, "base", arc_easy__letter_acc=accuracy(120, 200))
    # one question fewer right, and 60 others answered the other way: a wide paired interval
    save(store, "cand", arc_easy__letter_acc={f"q{i}": float(30 <= i < 149) for i in range(200)})
    assert check(store, "cand", "base", max_drop=1.0, suites=None).passed
    result = check(store, "cand", "base", max_drop=1.0, suites=None, margin=2.0)
    (row,) = result.rows
    assert row.low < -2.0 and not row.past_drop and row.past_margin
    assert not result.passed and result.past_margin == [row] and result.failures_within_noise == []
    assert "95% interval within 2" in render(result.table())
    # the same drop over 20,000 items: the interval is narrow enough to rule a 2-point drop out
    save(store, "base2", arc_easy__letter_acc=accuracy(12000, 20000))
    save(store, "cand2", arc_easy__letter_acc={f"q{i}": float(3000 <= i < 14900) for i in range(20000)})
    assert check(store, "cand2", "base2", max_drop=1.0, suites=None, margin=2.0).passed
    with pytest.raises(GateError, match="margin must be above 0"):
        check(store, "cand", "base", max_drop=1.0, suites=None, margin=0)


def test_fails_just_past_max_drop(store):
    save(store, "base", arc_easy__letter_acc=accuracy(520, 1000))
    save(store, "cand", arc_easy__letter_acc=accuracy(509, 1000))
    assert not check(store, "cand", "base", max_drop=1.0, suites=None).passed


def test_one_failing_row_fails_the_gate(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100), gsm8k__exact_match_5shot=accuracy(30, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(70, 100), gsm8k__exact_match_5shot=accuracy(20, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=None)
    assert not result.passed
    assert [r.key for r in result.failures] == ["gsm8k/exact_match_5shot"]
    assert [r.key for r in result.rows] == ["arc_easy/letter_acc", "gsm8k/exact_match_5shot"]


def test_uses_only_the_common_items(store):
    # The baseline's full run is 75% overall but 50% on the 100 items the candidate's --limit run saw.
    save(store, "base", mmlu__letter_acc=accuracy(50, 100) | {f"z{i}": 1.0 for i in range(100)})
    save(store, "cand", mmlu__letter_acc=accuracy(50, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=None)
    (row,) = result.rows
    assert result.passed
    assert (row.n, row.n_baseline, row.n_candidate, row.baseline, row.delta) == (100, 200, 100, 50.0, 0.0)
    assert "100 common (200 / 100)" in render(result.table())


def test_of_the_text_suite_only_looping_and_named_options_gate(store):
    # The reward model's score, BERTScore and answer lengths have no natural points: shown, never gating, even far
    # lower.
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100), rm__rm_score={"q1": 5.0, "q2": 5.0},
         sciq_text__bertscore_f1={"q1": 0.9, "q2": 0.9}, sciq_text__looping=accuracy(2, 100),
         sciq_text__answer_words={"q1": 90.0, "q2": 80.0}, sciq_text__names_key=accuracy(20, 100),
         sciq_text__names_distractor=accuracy(5, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(60, 100), rm__rm_score={"q1": -5.0, "q2": -5.0},
         sciq_text__bertscore_f1={"q1": 0.1, "q2": 0.1}, sciq_text__looping=accuracy(3, 100),
         sciq_text__answer_words={"q1": 9.0, "q2": 8.0}, sciq_text__names_key=accuracy(20, 100),
         sciq_text__names_distractor=accuracy(5, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=None)
    assert result.passed and result.suites == ["mcq", "gsm8k", "text"]
    gating = {row.key: row.gating for row in result.rows}
    assert gating == {"arc_easy/letter_acc": True, "sciq_text/bertscore_f1": False, "sciq_text/looping": True,
                      "sciq_text/answer_words": False, "sciq_text/names_key": True,
                      "sciq_text/names_distractor": True, "rm/rm_score": False}
    text = render(result.table())
    assert "raw units" in text and "info" in text


@pytest.mark.parametrize(("base", "cand", "passed"), [(2, 3, True), (2, 4, False), (30, 2, True), (5, 5, True)])
def test_looping_answers_may_rise_by_max_drop_points_and_fall_freely(store, base, cand, passed):
    save(store, "base", sciq_text__looping=accuracy(base, 100))
    save(store, "cand", sciq_text__looping=accuracy(cand, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=["text"])
    assert result.passed is passed
    assert [row.key for row in result.failures] == ([] if passed else ["sciq_text/looping"])


@pytest.mark.parametrize(("key", "distractor", "failures"), [
    ((20, 19), (5, 6), []), ((20, 18), (5, 5), ["sciq_text/names_key"]),
    ((20, 30), (5, 7), ["sciq_text/names_distractor"]), ((20, 40), (5, 2), [])])
def test_chat_answers_may_name_the_key_less_or_a_distractor_more_by_max_drop_points(store, key, distractor, failures):
    save(store, "base", sciq_text__names_key=accuracy(key[0], 100),
         sciq_text__names_distractor=accuracy(distractor[0], 100))
    save(store, "cand", sciq_text__names_key=accuracy(key[1], 100),
         sciq_text__names_distractor=accuracy(distractor[1], 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=["text"])
    assert [row.key for row in result.failures] == failures and result.passed == (not failures)


def test_a_failure_whose_interval_holds_zero_is_marked_as_possibly_noise(store):
    # 2 of 100 more answers loop: past a 1-point allowance, but 100 answers cannot tell that from no change; 30 more
    # of 1,000 can.
    save(store, "base", sciq_text__looping=accuracy(4, 100), gsm8k_text__looping=accuracy(40, 1000))
    save(store, "cand", sciq_text__looping=accuracy(6, 100), gsm8k_text__looping=accuracy(70, 1000))
    result = check(store, "cand", "base", max_drop=1.0, suites=["text"])
    assert not result.passed
    assert {row.key for row in result.failures} == {"sciq_text/looping", "gsm8k_text/looping"}
    assert [row.key for row in result.failures_within_noise] == ["sciq_text/looping"]


def test_newest_measurement_is_gated(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(40, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(61, 100))  # a re-run after a fix
    assert check(store, "cand", "base", max_drop=1.0, suites=None).passed


def test_a_later_smoke_run_does_not_replace_the_whole_split(store):
    """The newest run of a measurement used to win whatever its size: a --limit 40 run made after the full one
    turned a clear FAIL over 100 items into a PASS over 40."""
    save(store, "base", arc_easy__letter_acc=accuracy(70, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(60, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(28, 40))  # as many right as the baseline on those 40
    result = check(store, "cand", "base", max_drop=1.0, suites=["mcq"])
    assert not result.passed and result.rows[0].n == 100
    assert store.latest("cand").measurements[0].n == 100


def test_the_baselines_served_method_the_candidate_lacks_is_missing(store):
    """Without the candidate's `auto`, its letter figure gated the benchmark and the gate passed."""
    save(store, "base", arc_easy__letter_acc=accuracy(30, 100), arc_easy__mcq_acc_auto=accuracy(80, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(30, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=["mcq"])
    assert not result.passed and result.missing == ["arc_easy/mcq_acc_auto"]
    assert check(store, "cand", "base", max_drop=1.0, suites=["mcq"], allow_missing=True).passed


def test_without_a_served_method_each_format_only_the_baseline_has_is_missing(store):
    """Neither has `auto`, so each format gates on its own: the candidate's cloze alone passed the gate while its
    letter figure was never compared (found by a review)."""
    save(store, "base", arc_easy__letter_acc=accuracy(80, 100), arc_easy__cloze_acc=accuracy(50, 100))
    save(store, "cand", arc_easy__cloze_acc=accuracy(50, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=["mcq"])
    assert not result.passed and result.missing == ["arc_easy/letter_acc"] and not result.failures
    assert check(store, "cand", "base", max_drop=1.0, suites=["mcq"], allow_missing=True).passed
    # With `auto` on both sides, the other formats are information: a letter figure only one has is not missing.
    save(store, "base", arc_easy__mcq_acc_auto=accuracy(60, 100))
    save(store, "cand", arc_easy__mcq_acc_auto=accuracy(60, 100))
    assert check(store, "cand", "base", max_drop=1.0, suites=["mcq"]).passed
    # The rule is the MCQ suite's: a GSM8K mode only the baseline's history holds is shown, as before.
    save(store, "base", suite="gsm8k", gsm8k__exact_match_5shot=accuracy(9, 100),
         gsm8k__exact_match_old=accuracy(9, 100))
    save(store, "cand", suite="gsm8k", gsm8k__exact_match_5shot=accuracy(9, 100))
    assert check(store, "cand", "base", max_drop=1.0, suites=["gsm8k"]).missing == []
    # A mode every run scores is not: the candidate's 0-shot alone passed where its 5-shot was never compared.
    save(store, "base", suite="gsm8k", gsm8k__exact_match_0shot_cot=accuracy(9, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=["gsm8k"])
    assert not result.passed and result.missing == ["gsm8k/exact_match_0shot_cot"]


def test_suites_asked_by_name_must_each_be_gated(store):
    save(store, "base", arc_easy__mcq_acc_auto=accuracy(60, 100))
    save(store, "cand", arc_easy__mcq_acc_auto=accuracy(60, 100))
    by_default = check(store, "cand", "base", max_drop=1.0)
    assert by_default.passed and by_default.unmeasured == ["gsm8k", "text"]
    title = " ".join(render(by_default.table()).split())
    assert "gated on mcq" in title and "suite(s) gsm8k, text (not asked by --suites, so not required)" in title
    asked = check(store, "cand", "base", max_drop=1.0, suites=["mcq", "gsm8k"])
    assert not asked.passed and asked.unmeasured == ["gsm8k"]
    assert "(FAIL: asked by --suites)" in " ".join(render(asked.table()).split())
    assert check(store, "cand", "base", max_drop=1.0, suites=["mcq", "gsm8k"], allow_missing=True).passed


def test_a_benchmark_only_the_baseline_was_measured_on_fails_unless_allowed(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100), sciq__letter_acc=accuracy(60, 100),
         arc_easy__answer_prior_acc=accuracy(30, 100), sciq_text__bertscore_f1={"q1": 0.5},
         sciq_text__looping=accuracy(3, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(60, 100), gsm8k__exact_match_5shot=accuracy(9, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=None)
    # Measured by the baseline alone: a benchmark that would gate is missing, a score shown for information is not.
    assert not result.passed and result.missing == ["sciq/letter_acc", "sciq_text/looping"] and not result.failures
    assert result.skipped == ["arc_easy/answer_prior_acc", "gsm8k/exact_match_5shot", "sciq/letter_acc",
                              "sciq_text/bertscore_f1", "sciq_text/looping"]
    caption = " ".join(render(result.table()).split())
    assert "not measured on the baseline's sciq/letter_acc, sciq_text/looping (FAIL)" in caption
    allowed = check(store, "cand", "base", max_drop=1.0, suites=None, allow_missing=True)
    assert allowed.passed and "(allowed)" in render(allowed.table())
    assert check(store, "cand", "base", max_drop=1.0, suites=["mcq"]).missing == ["sciq/letter_acc"]  # suites asked


def test_a_text_share_only_the_baseline_has_fails_though_the_benchmark_gates_on_another(store):
    # The candidate's text run predates names_key: sciq_text still gates on looping, but the baseline's newer shares
    # cannot pass unchecked.
    save(store, "base", sciq_text__looping=accuracy(3, 100), sciq_text__names_key=accuracy(20, 100),
         sciq_text__names_distractor=accuracy(5, 100), sciq_text__answer_words={"q1": 40.0})
    save(store, "cand", sciq_text__looping=accuracy(3, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=["text"])
    assert not result.passed and not result.failures
    assert result.missing == ["sciq_text/names_distractor", "sciq_text/names_key"]
    assert check(store, "cand", "base", max_drop=1.0, suites=["text"], allow_missing=True).passed
    # The other way round (the baseline's run is the older one), nothing is missing: the shares are shown, not gated.
    assert check(store, "base", "cand", max_drop=1.0, suites=["text"]).passed


def test_a_row_over_too_few_common_items_fails_whatever_its_delta(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100))
    save(store, "cand", arc_easy__letter_acc={"q0": 1.0})  # one question: no drop, and a zero-width interval
    result = check(store, "cand", "base", max_drop=1.0, suites=None)
    (row,) = result.rows
    assert not result.passed and row.too_few and result.too_few == [row] and result.failures_within_noise == []
    assert "fewer than 30 common items (FAIL): arc_easy/letter_acc" in " ".join(render(result.table()).split())
    assert check(store, "cand", "base", max_drop=1.0, suites=None, min_items=1).passed
    with pytest.raises(GateError, match="at least 1"):
        check(store, "cand", "base", min_items=0)
    # the same model on both sides: every delta 0, a pass for anything (found by a review)
    with pytest.raises(GateError, match="the candidate and the baseline are both 'base'"):
        check(store, "base", "base")


def test_nothing_gating_in_common_is_an_error_not_a_pass(store):
    # The reward model's score fell far, but it never gates: a gate with no gating row would pass on nothing.
    save(store, "base", suite="text", rm__rm_score={"q1": 5.0, "q2": 5.0})
    save(store, "cand", suite="text", rm__rm_score={"q1": -5.0, "q2": -5.0})
    with pytest.raises(GateError, match="nothing is a gating measurement"):
        check(store, "cand", "base", suites=["text"])


def test_the_answer_prior_alone_never_gates(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100), arc_easy__answer_prior_acc=accuracy(30, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(60, 100), arc_easy__answer_prior_acc=accuracy(20, 100))
    result = check(store, "cand", "base", suites=["mcq"])
    assert result.passed and {r.key: r.gating for r in result.rows} == {
        "arc_easy/answer_prior_acc": False, "arc_easy/letter_acc": True}


def test_served_figures_of_a_record_the_entry_no_longer_serves_are_refused(tmp_path, default_model):


    from zephyr.mcq import MCQCalibration
    from zephyr.registry import ModelManifest, Registry

    registry = Registry(tmp_path / "models")
    for name in ("base", "cand"):
        registry.add(default_model.path, ModelManifest(name=name, method="sft"))
    record = MCQCalibration(method="cloze", weights={"cloze": 2.0}, created_at=datetime(2026, 12, 1, tzinfo=UTC))
    registry.record_calibration("cand", record)
    store = ResultStore(tmp_path / "results", registry)

    def served(model: str, details: dict) -> None:
        m = measurement("arc_easy", "mcq_acc_auto", "test", accuracy(60, 100))
        m.details.update(details)
        store.save(EvalRun(model=model, suite="mcq", measurements=[m]))

    served("base", {"record_created_at": None, "method": "cloze", "weights": {"cloze": 1.0}})
    served("cand", {"record_created_at": record.created_at.isoformat()})
    assert check(store, "cand", "base", suites=["mcq"]).passed
    registry.record_calibration("cand", record.model_copy(update={"created_at": datetime(2026, 12, 3, tzinfo=UTC)}))
    with pytest.raises(GateError, match="cand's arc_easy/mcq_acc_auto were measured under another /mcq calibration"):
        check(store, "cand", "base", suites=["mcq"])
    # Runs from before measurements named their record: told by the method and weights they were computed with.
    served("cand", {"method": "cloze", "weights": {"cloze": 2.0}})
    assert check(store, "cand", "base", suites=["mcq"]).passed
    served("cand", {"method": "cloze", "weights": {"cloze": 1.5}})
    with pytest.raises(GateError, match="recalibrated since"):
        check(store, "cand", "base", suites=["mcq"])
    served("cand", {})  # names no method or record (made by hand): nothing to tell it by, so judged as it is
    assert check(store, "cand", "base", suites=["mcq"]).passed
    # Figures measured through a server name the record it answered with (its /v1/models card): judged alike.
    current = registry.get("cand").manifest.mcq_calibration.created_at.isoformat()
    for model, when in (("base", None), ("cand", current)):
        m = measurement("arc_easy", "mcq_acc_auto_server", "test", accuracy(60, 100))
        m.details.update({"record_created_at": when, "method": "cloze"})
        store.save(EvalRun(model=model, suite="mcq", measurements=[m]))
    assert check(store, "cand", "base", suites=["mcq"]).passed
    m = measurement("arc_easy", "mcq_acc_auto_server", "test", accuracy(60, 100))
    m.details.update({"record_created_at": record.created_at.isoformat(), "method": "cloze"})
    store.save(EvalRun(model="cand", suite="mcq", measurements=[m]))
    with pytest.raises(GateError, match="cand's arc_easy/mcq_acc_auto_server were measured under another"):
        check(store, "cand", "base", suites=["mcq"])
    m.details = {"method": "cloze"}  # a server row from before servers said: taken on trust
    store.save(EvalRun(model="cand", suite="mcq", measurements=[m]))
    assert check(store, "cand", "base", suites=["mcq"]).passed


def test_missing_results_say_what_to_run(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100))
    with pytest.raises(GateError, match=r"run `zephyr eval run --model cand --suite mcq` first"):
        check(store, "cand", "base", max_drop=1.0, suites=None)
    with pytest.raises(GateError, match=r"--model nobase --suite mcq"):
        check(store, "base", "nobase", max_drop=1.0, suites=None)


def test_no_common_measurement_is_an_error(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100))
    save(store, "cand", suite="gsm8k", gsm8k__exact_match_5shot=accuracy(60, 100))
    with pytest.raises(GateError, match="no measurement in common") as info:
        check(store, "cand", "base", max_drop=1.0, suites=None)
    assert "arc_easy/letter_acc" in str(info.value) and "gsm8k/exact_match_5shot" in str(info.value)
    with pytest.raises(GateError, match="no measurement in common"):
        check(store, "cand", "base", max_drop=1.0, suites=["text"])


def test_disjoint_items_or_splits_are_an_error_not_a_pass(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100, prefix="a"))
    save(store, "cand", arc_easy__letter_acc=accuracy(60, 100, prefix="b"))
    with pytest.raises(GateError, match="no common item ids"):
        check(store, "cand", "base", max_drop=1.0, suites=None)
    save(store, "other", split="validation", arc_easy__letter_acc=accuracy(60, 100, prefix="a"))
    with pytest.raises(GateError, match="different splits"):
        check(store, "other", "base", max_drop=1.0, suites=None)


def read(benchmark: str, metric: str, digests: dict[str, str], correct: int = 60) -> Measurement:
    return measurement(benchmark, metric, "test", accuracy(correct, 100), data_digest=digests)


def test_runs_that_read_different_questions_are_not_compared(store):
    def save_read(model: str, digest: str | None, source: str) -> None:
        ms = [read("arc_easy", metric, {"arc_easy": digest} if digest else {}) for metric in ("mcq_acc_auto",
                                                                                               "cloze_acc")]
        store.save(EvalRun(model=model, suite="mcq", measurements=ms, data={"arc_easy": source}))

    save_read("base", "aaaa", "/data/arc")
    save_read("cand", "bbbb", "/elsewhere/arc")
    with pytest.raises(GateError) as refused:
        check(store, "cand", "base", max_drop=1.0, suites=["mcq"])
    message = " ".join(str(refused.value).split())
    # One clause for the benchmark, naming both sources, whatever number of its metrics it holds for.
    assert message.count("different arc_easy items") == 1
    assert ("arc_easy/cloze_acc, arc_easy/mcq_acc_auto: the two read different arc_easy items (candidate: "
            "/elsewhere/arc, digest bbbb; baseline: /data/arc, digest aaaa)") in message
    assert "`--data arc_easy=FILE`" in message
    save_read("cand", "aaaa", "/elsewhere/arc")  # the same questions under another path: compared
    assert check(store, "cand", "base", max_drop=1.0, suites=["mcq"]).passed
    save_read("old", None, "/elsewhere/arc")  # a run saved before digests were recorded is taken on trust
    assert check(store, "old", "base", max_drop=1.0, suites=["mcq"]).passed


def test_answers_generated_under_other_token_limits_are_not_compared(store):
    """A candidate's GSM8K answers cut at 128 tokens were compared with a baseline's at 256 as like for like."""
    def save_generated(model: str, conditions: dict | None) -> None:
        m = measurement("gsm8k", "exact_match_5shot", "test", accuracy(60, 100))
        if conditions is not None:
            m.details["conditions"] = conditions
        store.save(EvalRun(model=model, suite="gsm8k", measurements=[m]))

    served = {"gsm8k_max_tokens": 256, "text_max_tokens": 128, "system_prompt": "abcd"}
    save_generated("base", served)
    save_generated("cand", served | {"gsm8k_max_tokens": 128})
    with pytest.raises(GateError, match="other conditions .candidate vs baseline: gsm8k_max_tokens 128 vs 256"):
        check(store, "cand", "base", suites=["gsm8k"])
    save_generated("cand", served)
    assert check(store, "cand", "base", suites=["gsm8k"]).passed
    save_generated("old", None)  # from before conditions were recorded: taken on trust
    assert check(store, "old", "base", suites=["gsm8k"]).passed


def test_each_measurement_is_judged_by_the_data_it_was_computed_on(store):
    store.save(EvalRun(model="base", suite="mcq", measurements=[read("sciq", "mcq_acc_auto", {"sciq": "aaaa"})]))
    store.save(EvalRun(model="cand", suite="mcq", measurements=[read("sciq", "mcq_acc_auto", {"sciq": "aaaa"})]))
    # A later text-suite run of the candidate on another SciQ file does not relabel its MCQ figures.
    store.save(EvalRun(model="cand", suite="text", measurements=[read("sciq_text", "looping", {"sciq": "bbbb"}, 5)]))
    assert check(store, "cand", "base", max_drop=1.0, suites=["mcq"]).passed


def test_only_gsm8k_5_shot_rests_on_the_train_split_of_its_examples(store):
    def save_read(model: str, train_digest: str) -> None:
        store.save(EvalRun(model=model, suite="gsm8k", measurements=[
            read("gsm8k", "exact_match_5shot", {"gsm8k": "aaaa", "gsm8k:train": train_digest}, 10),
            read("gsm8k", "exact_match_0shot_cot", {"gsm8k": "aaaa"}, 10)]))

    save_read("base", "1111")
    save_read("cand", "2222")
    with pytest.raises(GateError) as refused:
        check(store, "cand", "base", max_drop=1.0, suites=["gsm8k"])
    message = " ".join(str(refused.value).split())
    assert "gsm8k/exact_match_5shot: the two read different gsm8k:train items" in message
    assert "exact_match_0shot_cot" not in message and "the same ZEPHYR_DATA_DIR: GSM8K's examples" in message


@pytest.mark.parametrize(("benchmark", "metric", "reads"), [
    ("arc_easy", "mcq_acc_auto", ("arc_easy",)), ("sciq_text", "looping", ("sciq",)), ("rm", "rm_score", ("sciq",)),
    ("gsm8k", "exact_match_5shot", ("gsm8k", "gsm8k:train")), ("gsm8k", "exact_match_0shot_cot", ("gsm8k",)),
    ("gsm8k_text", "looping", ("gsm8k",)),
])
def test_what_each_measurement_reads(benchmark, metric, reads):
    assert data_read(benchmark, metric) == reads


def test_unknown_suite_is_an_error(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100))
    with pytest.raises(GateError, match="unknown suite.*mmlu.*known: mcq, gsm8k, text"):
        check(store, "cand", "base", max_drop=1.0, suites=["mcq", "mmlu"])


def test_the_served_method_decides_an_mcq_benchmark_both_models_have_it_for(store):
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100), arc_easy__mcq_acc_auto=accuracy(50, 100),
         sciq__letter_acc=accuracy(60, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(40, 100), arc_easy__mcq_acc_auto=accuracy(55, 100),
         sciq__letter_acc=accuracy(40, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=["mcq"])
    gating = {row.key: row.gating for row in result.rows}
    assert gating == {"arc_easy/letter_acc": False, "arc_easy/mcq_acc_auto": True, "sciq/letter_acc": True}
    assert [row.key for row in result.failures] == ["sciq/letter_acc"]  # no served method measured for sciq
    text = render(result.table())
    assert "info" in text and "mcq_acc_auto" in text

    save(store, "cand", arc_easy__letter_acc=accuracy(40, 100), arc_easy__mcq_acc_auto=accuracy(45, 100),
         sciq__letter_acc=accuracy(60, 100))
    assert [row.key for row in check(store, "cand", "base", suites=["mcq"]).failures] == ["arc_easy/mcq_acc_auto"]


def test_one_vocabulary_of_benchmarks_methods_and_metrics():
    from evals import calibrate, gate, run
    from evals.results import METHOD_METRICS, SERVED_METRICS, SUITE_BENCHMARKS, method_metric
    from offline import benchmarks
    from zephyr import mcq

    # Every /mcq method has its metric, in zephyr.mcq's order; through a server the same name ends in _server.
    assert tuple(METHOD_METRICS) == mcq.METHODS
    assert method_metric("explain", server=True) == "letter_acc_explain_server"
    assert SERVED_METRICS == ("mcq_acc_auto", "mcq_acc_auto_server") and gate.SERVED_METRICS is SERVED_METRICS
    # The MCQ benchmarks are the loaders' list wherever they are named.
    assert SUITE_BENCHMARKS["mcq"] is benchmarks.MCQ_BENCHMARKS and tuple(run.SUITES) == tuple(SUITE_BENCHMARKS)
    assert tuple(calibrate.CALIBRATION_SPLITS) == benchmarks.MCQ_BENCHMARKS
    # Calibration reads validation data, from train where validation is what we report (OpenBookQA's local copy).
    assert calibrate.CALIBRATION_SPLITS == {"arc_easy": "validation", "arc_challenge": "validation",
                                            "mmlu": "validation", "sciq": "validation", "openbookqa": "train"}


# --- reviewers' blind A/B ------------------------------------------------------------------------------------------


def verdicts(candidate_wins: int, baseline_wins: int, candidate: str = "cand", baseline: str = "base") -> list[dict]:
    """Exported DPO pairs (`zephyr review export --format dpo`) of the candidate's answer against the baseline's."""
    def pair(winner: str, loser: str, n: int) -> dict:
        return {"prompt": [{"role": "user", "content": f"q{n}"}], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
                "meta": {"label": "candidate" if winner == candidate else "served", "chosen_model": winner,
                         "rejected_model": loser, "item_ids": [f"item{n}"],
                         "kept": {"flagged": True, "unfinished": True}}}
    return ([pair(candidate, baseline, n) for n in range(candidate_wins)]
            + [pair(baseline, candidate, candidate_wins + n) for n in range(baseline_wins)])


@pytest.mark.parametrize(("wins", "losses", "passed", "why"), [
    (24, 16, True, "the lower bound clears 40%"),        # 60%, Wilson [44.6%, 73.7%]
    (20, 20, False, "the lower bound is below 40%"),     # 50%, Wilson [35.2%, 64.8%]: too unsure to promote
    (20, 5, False, "25 decisive review pairs, fewer than the 30 required"),  # convincing, but too few verdicts
    (10, 30, False, "the lower bound is below 40%"),
])
def test_review_rule_needs_enough_pairs_and_a_win_rate_interval_above_the_threshold(store, wins, losses, passed,
                                                                                   why):
    from evals.gate import review_gate

    save(store, "base", arc_easy__mcq_acc_auto=accuracy(50, 100))
    save(store, "cand", arc_easy__mcq_acc_auto=accuracy(50, 100))
    reviews = review_gate(verdicts(wins, losses), "cand", "base", source="reviews.jsonl")
    assert (reviews.wins, reviews.losses, reviews.n) == (wins, losses, wins + losses)
    assert reviews.passed is passed and why in reviews.reason
    result = check(store, "cand", "base", suites=["mcq"], reviews=reviews)
    assert not result.failures  # the benchmarks pass: the human verdict alone decides
    assert result.passed is passed
    assert ("PASS" if passed else "FAIL") in render(result.table()) and why in render(result.table())


def test_review_rule_counts_only_pairs_of_the_two_models_whichever_side_served():
    from evals.gate import review_gate

    records = (verdicts(20, 12) + verdicts(9, 0, candidate="cand", baseline="other")
               + verdicts(0, 7, candidate="base", baseline="cand"))  # base served the candidate's answers here
    reviews = review_gate(records, "cand", "base", min_pairs=10, min_win_rate=0.5)
    assert (reviews.wins, reviews.losses) == (27, 12)
    assert reviews.win_rate == pytest.approx(27 / 39) and reviews.ci95[0] > 0.5 and reviews.passed


@pytest.mark.parametrize(("records", "rule", "message"), [
    (verdicts(5, 5, candidate="x", baseline="y"), {}, r"hold no pair of cand against base \(pairs seen: x vs y\)"),
    ([], {}, r"pairs seen: none\). Serve base with ZEPHYR_REVIEW_CANDIDATE=remote"),
    (verdicts(5, 5), {"min_pairs": 0}, "at least 1, got 0"),
    (verdicts(5, 5), {"min_win_rate": 1.5}, r"a share in \[0, 1\], got 1.5"),
    # a default export dropped the pairs a flagged answer won: refused, not counted
    ([{**r, "meta": {**r["meta"], "kept": {"flagged": False, "unfinished": True}}} for r in verdicts(30, 5)], {},
     r"35 pair\(s\) come from an export that left out others; export with .* --include-flagged --include-unfinished"),
    ([{**r, "meta": {k: v for k, v in r["meta"].items() if k != "kept"}} for r in verdicts(30, 5)], {},
     "come from an export that left out others"),  # files from before the export said
    # a file `zephyr data review` made for training from a whole export: what it dropped is gone from the count
    ([{**r, "meta": {**r["meta"], "kept": {**r["meta"]["kept"], "for_training": True}}} for r in verdicts(30, 5)],
     {}, "come from an export that left out others"),
    # keeping only items most reviewers agreed on keeps them by how they came out
    ([{**r, "meta": {**r["meta"], "kept": {**r["meta"]["kept"], "min_agreement": 0.8}}} for r in verdicts(30, 5)],
     {}, r"left out others; export with .*\(no --min-agreement\)"),
])
def test_review_rule_errors_say_what_to_fix(records, rule, message):
    from evals.gate import review_gate

    with pytest.raises(GateError, match=message):
        review_gate(records, "cand", "base", **rule)


def test_review_rule_counts_only_pairs_the_registrys_weights_of_each_name_wrote():
    from evals.gate import review_gate
    from zephyr.registry import ModelManifest

    def answered(records: list[dict], when: datetime | None, revisions: dict[str, str] | None = None) -> list[dict]:
        """The pairs answered at `when`, each answer's row naming its weights (`revisions` by model), if given."""
        return [{**r, "meta": {**r["meta"], "created_at": when.isoformat() if when else None, **({
            f"{side}_revision": revisions[r["meta"][f"{side}_model"]] for side in ("chosen", "rejected")}
            if revisions else {})}} for r in records]

    remade = datetime(2026, 12, 3, 0, 0, 0, 900000, tzinfo=UTC)
    cand = ModelManifest(name="cand", method="dpo", created_at=remade)
    base = ModelManifest(name="base", method="base", data_digest="sha256:abc",  # the bundled model: its digest
                         created_at=datetime(2026, 12, 5, tzinfo=UTC))  # prepared again on this machine
    assert cand.revision == "made:2026-12-03T00:00:00+00:00" and base.revision == "sha256:abc"
    entries = {"cand": cand, "base": base}
    old, new = datetime(2026, 12, 2, tzinfo=UTC), datetime(2026, 12, 4, tzinfo=UTC)
    now = {"cand": cand.revision, "base": base.revision}
    records = (answered(verdicts(0, 20), new, now | {"cand": "made:2026-12-01T00:00:00+00:00"})  # the candidate's
               # earlier weights lost, served after the entry was remade
               + answered(verdicts(12, 8), new, now)
               + answered(verdicts(5, 0, baseline="other"), new, {"cand": "made:x", "other": "x"}))
    assert review_gate(records, "cand", "base", min_pairs=10).n == 40  # by name alone, every pair counts
    reviews = review_gate(records, "cand", "base", min_pairs=10, entries=entries)
    assert (reviews.wins, reviews.losses, reviews.stale) == (12, 8, 20)
    assert "20 pair(s) left out: written by other weights" in reviews.reason
    # Pairs exported before rows named their weights: by when they were answered (on or after the entry was made).
    legacy = answered(verdicts(3, 0), old) + answered(verdicts(4, 1), new) + answered(verdicts(1, 0), None)
    assert (review_gate(legacy, "cand", "base", min_pairs=1, entries={"cand": cand}).n,
            review_gate(legacy, "cand", "base", min_pairs=1, entries={"cand": cand}).stale) == (5, 4)
    # A hand-written manifest's naive time is read as UTC.
    naive = ModelManifest(name="c", method="dpo", created_at=datetime(2026, 12, 3))
    assert naive.created_at_utc == datetime(2026, 12, 3, tzinfo=UTC) and naive.created_at.tzinfo is None  # as written
    assert review_gate(legacy, "cand", "base", min_pairs=1, entries={"cand": naive}).n == 5
    with pytest.raises(GateError, match=r"all 20 pair\(s\) of cand against base were written by other weights "
                                        r".*\(base sha256:abc, cand made:2026-12-03T00:00:00\+00:00\).*ZEPHYR_HOME"):
        review_gate(records[:20], "cand", "base", entries=entries)


def test_generation_rows_from_runs_before_reproducible_reruns_are_named(store):
    def text_run(model: str, looping: int, engine: dict, reward_model: bool = True) -> None:
        items = {f"q{i}": float(i < looping) for i in range(100)}
        # the reward model's row is shown, never gated: a rerun without --reward-model leaves it old
        scores = [measurement("rm", "rm_score", "test", {"q0": 1.0})] if reward_model else []
        store.save(EvalRun(model=model, suite="text", engine=engine,
                           measurements=[measurement("gsm8k_text", "looping", "test", items), *scores]))

    in_process = {"engine_core": IN_PROCESS}
    text_run("base", 4, {})  # made before offline engines kept vLLM's core in process
    text_run("cand", 4, in_process)
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100))  # scored, not generated: never named
    save(store, "cand", arc_easy__letter_acc=accuracy(60, 100))
    result = check(store, "cand", "base", max_drop=1.0, suites=None)
    assert result.passed and result.unreproducible == {"base": ["gsm8k_text/looping"]}
    assert result.rerun_suites("base") == ["text"] and result.rerun_suites("cand") == []
    text_run("base", 4, in_process, reward_model=False)  # a rerun now supplies the gating row
    assert check(store, "cand", "base", max_drop=1.0, suites=None).unreproducible == {}


@pytest.mark.parametrize("metric", ["letter_acc", "cloze_acc_norm", "mcq_acc_auto", "mcq_acc_auto_server",
                                    "answer_prior_acc", "exact_match", "looping", "names_key",
                                    "names_distractor"])
def test_accuracy_like_metrics_are_shares_compared_in_points(metric):
    """One vocabulary for the gate, the report and `eval show`: a share's --max-drop is points, not units (an
    answer_prior_acc gating in raw units would have let a 100-point drop pass)."""
    from evals.results import is_share

    assert is_share(metric)


def test_scores_in_their_own_units_are_not_shares():
    from evals.results import is_share

    assert not any(is_share(metric) for metric in ("rm_score", "bertscore_f1", "answer_words"))


def test_a_damaged_result_file_is_skipped_not_fatal(store):
    save(store, "m", arc_easy__letter_acc=accuracy(60, 100))
    (store.folder("m") / "runs" / "mcq-99990101T000000000000Z.json").write_text('{"model": "m", "sui')
    assert [m.key for m in store.latest("m").measurements] == ["arc_easy/letter_acc"]


def test_runs_of_an_entry_replaced_under_the_same_name_are_not_this_models(tmp_path, default_model):
    """`train ... --overwrite` makes another model under the old name: the gate must not judge it on the old
    weights' GSM8K run. Runs saved before entries were recorded stay readable."""
    from zephyr.registry import ModelManifest, Registry

    registry = Registry(tmp_path / "models")
    first = registry.add(default_model.path, ModelManifest(name="m", method="sft"))
    store = ResultStore(tmp_path / "results", registry)
    ms = [measurement("gsm8k", "exact_match", "test", accuracy(30, 100))]
    store.save(EvalRun(model="m", suite="mcq", measurements=[measurement("sciq", "letter_acc", "test",
                                                                          accuracy(50, 100))]))  # unrecorded
    store.save(EvalRun.of_entry(first, "gsm8k", measurements=ms))  # as eval run saves it
    assert {m.key for m in store.latest("m").measurements} == {"sciq/letter_acc", "gsm8k/exact_match"}
    second = registry.add(default_model.path, ModelManifest(name="m", method="dpo"), overwrite=True)
    assert {m.key for m in store.latest("m").measurements} == {"sciq/letter_acc"}
    store.save(EvalRun.of_entry(second, "gsm8k", measurements=ms))
    assert {m.key for m in store.latest("m").measurements} == {"sciq/letter_acc", "gsm8k/exact_match"}
    assert {m.key for m in ResultStore(tmp_path / "results").latest("m").measurements} == {
        "sciq/letter_acc", "gsm8k/exact_match"}  # without the registry: every run, as before


def test_reward_model_scores_by_different_reward_models_are_not_compared(store):

    def scored(by: str, value: float) -> EvalRun:
        m = measurement("rm", "rm_score", "test", {"q1": value, "q2": value})
        m.details["reward_model"] = by
        return EvalRun(model="x", suite="text", measurements=[m])

    assert len(compare_runs(scored("rm-a", 1.0), scored("rm-a", 2.0))[0]) == 1
    assert compare_runs(scored("rm-a", 1.0), scored("rm-b", 2.0)) == ([], {})


def test_a_reward_model_retrained_under_the_same_name_is_another_judge():
    def scored(revision: str | None) -> EvalRun:
        m = measurement("rm", "rm_score", "test", {"q1": 1.0, "q2": 2.0})
        m.details.update({"reward_model": "rm-hh"} | ({"reward_model_revision": revision} if revision else {}))
        return EvalRun(model="x", suite="text", measurements=[m])

    assert compare_runs(scored("made:2026-12-01T00:00:00+00:00"), scored("made:2026-12-07T00:00:00+00:00")) == (
        [], {})
    assert len(compare_runs(scored("made:2026-12-01T00:00:00+00:00"), scored(None))[0]) == 1  # older run: on trust


def test_an_info_row_that_cannot_be_compared_is_listed_not_a_refusal_of_the_gate(store):
    """An empty reward-model measurement (it scores NaN) raised "cannot compare" for the whole gate, though no
    verdict rests on it; a gating row that cannot be compared still refuses."""
    save(store, "base", arc_easy__letter_acc=accuracy(60, 100), rm__rm_score={})
    save(store, "cand", arc_easy__letter_acc=accuracy(61, 100), rm__rm_score={})
    result = check(store, "cand", "base", max_drop=1.0, suites=None)
    assert result.passed and [row.key for row in result.rows] == ["arc_easy/letter_acc"]
    assert list(result.not_comparable) == ["rm/rm_score"] and result.not_comparable["rm/rm_score"]
    save(store, "base-2", arc_easy__letter_acc={}, sciq__letter_acc=accuracy(60, 100))
    save(store, "cand-2", arc_easy__letter_acc={}, sciq__letter_acc=accuracy(60, 100))
    with pytest.raises(GateError, match="cannot compare cand-2 with base-2 on arc_easy/letter_acc"):
        check(store, "cand-2", "base-2", max_drop=1.0, suites=None)


def test_bertscore_and_dialogrpt_by_other_judges_are_not_compared():
    def scored(metric: str, value: float, **judge) -> EvalRun:
        m = measurement("sciq_text", metric, "test", {"q1": value, "q2": value})
        m.details.update(judge)
        return EvalRun(model="x", suite="text", measurements=[m])

    same = {"backbone": "all-MiniLM-L6-v2", "num_layers": None}
    assert len(compare_runs(scored("bertscore_f1", 0.5, **same), scored("bertscore_f1", 0.6, **same))[0]) == 1
    deeper = same | {"num_layers": 9}
    assert compare_runs(scored("bertscore_f1", 0.5, **deeper), scored("bertscore_f1", 0.6, **same)) == ([], {})
    other = same | {"backbone": "roberta-large"}
    assert compare_runs(scored("bertscore_f1", 0.5, **other), scored("bertscore_f1", 0.6, **same)) == ([], {})
    assert compare_runs(scored("updown", 0.5, dialogrpt_weights="updown"),
                        scored("updown", 0.6, dialogrpt_weights="width")) == ([], {})
    older = scored("updown", 0.5)  # from before the weights were recorded: taken on trust
    assert len(compare_runs(older, scored("updown", 0.6, dialogrpt_weights="updown"))[0]) == 1
    # the served method's rows record the calibration record's feature weights: each model's own, never a judge
    served = [measurement("arc_easy", "mcq_acc_auto", "test", {"q1": 1.0, "q2": 0.0}) for _ in range(2)]
    served[0].details["weights"], served[1].details["weights"] = {"cloze": 1.0}, {"letter": 0.8, "cloze": 0.3}
    assert len(compare_runs(*(EvalRun(model="x", suite="mcq", measurements=[m]) for m in served))[0]) == 1


def test_options_scored_after_other_prompts_are_not_compared(store):
    """A child with no calibration record of its own is scored zero-shot where its parent is scored after five
    demonstrations: its cloze row beside the parent's would mix the prompts' effect into the weights'. Beside both
    models' served method the row is skipped; where it would decide the benchmark, the gate refuses."""
    def save(model: str, demonstrations: str, served: bool = True) -> None:
        cloze = measurement("arc_easy", "cloze_acc", "test", accuracy(50, 100))
        if demonstrations:
            cloze.details["demonstrations"] = demonstrations
        prior = measurement("arc_easy", "answer_prior_acc", "test", accuracy(30, 100))
        prior.details["context"] = "Answer:"
        ms = [cloze, prior] + ([measurement("arc_easy", "mcq_acc_auto", "test", accuracy(55, 100))] if served else [])
        store.save(EvalRun(model=model, suite="mcq", measurements=ms))

    save("base", "Question: ...\nAnswer: a\n\n")
    save("child", "")
    result = check(store, "child", "base", suites=["mcq"])
    assert result.passed and result.skipped == []  # both have it: not "only one model has"
    assert "scored after other prompts" in result.not_comparable["arc_easy/cloze_acc"]
    assert "not compared, arc_easy/cloze_acc: the options were scored after" in render(result.table())
    assert [row.key for row in result.rows] == ["arc_easy/answer_prior_acc", "arc_easy/mcq_acc_auto"]
    rows, problems = compare_runs(store.latest("child"), store.latest("base"))  # the report names why
    assert "arc_easy/cloze_acc" not in {row.key for row in rows}
    assert "demonstrations none vs sha256" in problems["arc_easy/cloze_acc"]
    # served through a server by one and in process by the other: no served row is compared, so cloze would decide
    base_server = measurement("arc_easy", "mcq_acc_auto_server", "test", accuracy(55, 100))
    cloze = measurement("arc_easy", "cloze_acc", "test", accuracy(50, 100))
    cloze.details["demonstrations"] = "Question: ...\nAnswer: a\n\n"
    store.save(EvalRun(model="base-server", suite="mcq", measurements=[base_server, cloze]))
    with pytest.raises(GateError, match="arc_easy/cloze_acc: the options were scored after other prompts"):
        check(store, "child", "base-server", suites=["mcq"])
    save("base-unserved", "Question: ...\nAnswer: a\n\n", served=False)
    save("child-unserved", "", served=False)
    with pytest.raises(GateError, match="arc_easy/cloze_acc: the options were scored after other prompts"):
        check(store, "child-unserved", "base-unserved", suites=["mcq"])


def test_rows_computed_in_other_dtypes_are_named(store):
    """A machine with AMX serves bfloat16 and one without float32: the delta may then hold numerics, not the model."""
    for model, dtype in (("base", "float32"), ("cand", "bfloat16")):
        store.save(EvalRun(model=model, suite="mcq", engine={"dtype": dtype}, measurements=[
            measurement("arc_easy", "letter_acc", "test", accuracy(50, 100))]))
    assert check(store, "cand", "base").unlike_dtypes == ["arc_easy/letter_acc (bfloat16 vs float32)"]
    store.save(EvalRun(model="cand", suite="mcq", engine={"dtype": "float32"}, measurements=[
        measurement("arc_easy", "letter_acc", "test", accuracy(50, 100))]))  # the same size: it replaces the first
    assert check(store, "cand", "base").unlike_dtypes == []


@pytest.mark.parametrize("max_drop", [-1.0, float("nan"), float("inf")])
def test_the_allowed_drop_is_a_finite_number_of_points_not_below_zero(store, max_drop):
    save(store, "base", arc_easy__letter_acc=accuracy(50, 100))
    save(store, "cand", arc_easy__letter_acc=accuracy(50, 100))
    with pytest.raises(GateError, match="the allowed drop is a finite number of points, 0 or more"):
        check(store, "cand", "base", max_drop=max_drop)


def test_a_score_both_have_by_other_judges_is_named_as_such_not_as_one_models(store):
    for model, backbone in (("base", "all-MiniLM-L6-v2"), ("cand", "roberta-large")):
        looping = measurement("sciq_text", "looping", "test", accuracy(3, 100))
        f1 = measurement("sciq_text", "bertscore_f1", "test", {"q1": 0.5})
        f1.details["backbone"] = backbone
        store.save(EvalRun(model=model, suite="text", measurements=[looping, f1]))
    result = check(store, "cand", "base", suites=["text"])
    assert result.passed and result.skipped == []
    assert "different judges" in result.not_comparable["sciq_text/bertscore_f1"]


def test_a_reviews_file_that_cannot_be_read_says_so(tmp_path, monkeypatch):
    """An OSError opening it escaped: the report blamed --out, and the gate showed a traceback (found by a
    review)."""
    from evals import preference

    path = tmp_path / "reviews.jsonl"
    path.write_text("{}\n")

    def unreadable(_path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(preference, "read_export", unreadable)
    with pytest.raises(ValueError, match=f"cannot read reviews file {path}: Permission denied"):
        preference.read_review_records(path)
