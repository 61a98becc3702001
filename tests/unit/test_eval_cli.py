"""`zephyr eval` refuses bad requests before any engine starts, with a message that says what to fix."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.app import app
from offline.engine import IN_PROCESS


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path))
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--model", "m", "--suite", "vibes"], "unknown suite 'vibes'"),
    (["run", "--model", "m", "--limit", "0"], "--limit must be at least 1"),
    (["run", "--model", "nope"], "no model 'nope' in the registry"),
    (["run", "--model", "m", "--data", "sciq"], "--data takes NAME=PATH_OR_HUB_NAME"),
    (["show", "--model", "m"], "run `zephyr eval run --model m --suite mcq` first"),
    (["gate", "--candidate", "a", "--baseline", "b"], "zephyr eval run --model"),
    (["report", "--models", ","], "--models needs at least one model name"),
    # the record's own rule: the CLI stripped before counting, so 7 + 200 spaces passed it and failed the record
    (["calibrate", "--model", "m", "--answer-prior-context", "Answer:" + " " * 200], "--answer-prior-context: the "
     "answer prior's cue must hold 1 to 200 characters"),
    (["calibrate", "--model", "m", "--answer-prior-context", "   "], "--answer-prior-context: the answer prior's"),
])
def test_bad_requests(home, args, message):
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())


@pytest.fixture
def registered(home):
    from zephyr.registry import ModelManifest

    folder = home / "models" / "m"
    folder.mkdir(parents=True)
    (folder / "zephyr.json").write_text(ModelManifest(name="m", method="base").model_dump_json())
    (folder / "config.json").write_text("{}")
    return home


@pytest.mark.parametrize(("args", "message"), [
    (["--benchmarks", "arc_easy,hellaswag"], "unknown MCQ benchmark 'hellaswag'"),
    (["--data", "squad=x.json"], "--data names unknown benchmark 'squad'"),
    (["--no-local"], "--no-local needs --server URL"),
    (["--no-local", "--server", "http://x", "--suite", "gsm8k"], "only the mcq suite"),
    (["--benchmarks", "arc_easy"], "ARC-Easy-Test.jsonl does not exist: set ZEPHYR_DATA_DIR"),
    (["--suite", "gsm8k"], "gsm8k/test.jsonl does not exist"),
    (["--suite", "gsm8k,text"], "gsm8k/test.jsonl does not exist"),
    (["--suite", "mcq,vibes"], "unknown suite 'vibes'; choose all, or one or more of mcq, gsm8k, text"),
    (["--suite", " , "], "unknown suite"),
    (["--no-local", "--server", "http://x", "--suite", "mcq,text"], "only the mcq suite"),
    (["--suite", "gsm8k", "--explain"], "--explain changes how the mcq suite asks; add the mcq suite"),
    (["--no-letter", "--no-cloze"], "--no-letter with --no-cloze leaves the mcq suite nothing to score"),
    (["--no-letter", "--explain"], "--explain is a letter format; drop --no-letter"),
    (["--suite", "all", "--gsm8k-max-tokens", "0"], "--gsm8k-max-tokens must be at least 1, got 0"),
    (["--no-local", "--server", "http://127.0.0.1:9", "--benchmarks", "arc_easy"], "cannot reach --server"),
    (["--no-local", "--server", "foo", "--benchmarks", "arc_easy"], "cannot reach --server foo"),
])
def test_bad_runs_fail_before_the_engine(registered, args, message):
    result = CliRunner().invoke(app, ["eval", "run", "--model", "m", *args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert "starting vLLM" not in result.output


def test_suites_run_in_an_order_where_text_reuses_gsm8k_generations():
    from evals.run import suites_of

    assert suites_of("all") == ["mcq", "gsm8k", "text"]
    assert suites_of("text, gsm8k") == ["gsm8k", "text"]
    assert suites_of("mcq,mcq") == ["mcq"]


def test_no_letter_skips_the_letter_format_and_still_measures_auto_from_cloze(monkeypatch):
    """A model served by cloze needs no letter pass (the slowest part of a test-set run): --no-letter skips it, and
    auto (cloze without a calibration record) is computed from the cloze scores alone."""
    from rich.console import Console

    from evals import mcq_eval, run
    from evals.results import Measurement
    from zephyr.schemas import MCQItem

    items = [MCQItem(id=f"q{i}", question="Which?", options=["red", "blue", "green"], answer="B") for i in range(4)]
    lls = {f"q{i}": [-3.0, -1.0 if i < 3 else -5.0, -4.0] for i in range(4)}
    cloze = Measurement(benchmark="arc_easy", metric="cloze_acc", split="test", n=4, score=0.75,
                        items={k: float(v[1] == max(v)) for k, v in lls.items()}, seconds=1.0,
                        details={"loglikelihoods": lls})
    monkeypatch.setattr(mcq_eval, "cloze", lambda *_a, **_k: [cloze])

    class Engine:
        lm_eval_model = None

        def letter(self, *_a, **_k):
            raise AssertionError("--no-letter must not score the letter format")

    options = run.RunOptions(model="m", suite="mcq", letter=False)
    out = run._mcq_suite(Engine(), {"arc_easy": ("test", items)}, ["arc_easy"], options, Console(quiet=True))
    assert [m.metric for m in out] == ["cloze_acc", "mcq_acc_auto"]
    auto = out[-1]
    assert auto.details["method"] == "cloze" and not auto.details["calibrated"]
    assert auto.score == 0.75 and auto.details["answers"]["q3"] == "A"


def test_gate_with_reviews_reads_an_export_and_fails_on_the_human_verdict(home, tmp_path):
    import json

    from evals.results import EvalRun, ResultStore, measurement
    from zephyr.settings import Settings

    store = ResultStore(Settings(home=home).resolved_eval_results_dir)
    for model in ("base", "cand"):
        items = {f"q{i}": float(i < 50) for i in range(100)}
        store.save(EvalRun(model=model, suite="mcq", measurements=[measurement("arc_easy", "mcq_acc_auto", "test",
                                                                                 items)]))

    def export(name: str, cand_wins: int, base_wins: int):
        path = tmp_path / name
        rows = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}],
                 "meta": {"chosen_model": w, "rejected_model": lo, "item_ids": [f"i{n}"],
                          "kept": {"flagged": True, "unfinished": True}}}
                for n, (w, lo) in enumerate([("cand", "base")] * cand_wins + [("base", "cand")] * base_wins)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    gate = ["eval", "gate", "--candidate", "cand", "--baseline", "base", "--suites", "mcq"]
    ok = CliRunner().invoke(app, [*gate, "--reviews", export("good.jsonl", 18, 12)])
    assert ok.exit_code == 0, ok.output
    assert "18 of 30 pairs" in " ".join(ok.output.split())
    unsure = CliRunner().invoke(app, [*gate, "--reviews", export("unsure.jsonl", 17, 13)])
    assert unsure.exit_code == 1 and "gate failed on human review" in unsure.output
    looser = CliRunner().invoke(app, [*gate, "--reviews", export("unsure.jsonl", 17, 13), "--min-win-rate", "0.35"])
    assert looser.exit_code == 0, looser.output
    few = CliRunner().invoke(app, [*gate, "--reviews", export("few.jsonl", 9, 1), "--min-review-pairs", "20"])
    assert few.exit_code == 1 and "fewer than the 20 required" in " ".join(few.output.split())
    missing = CliRunner().invoke(app, [*gate, "--reviews", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 1 and "zephyr review export --format dpo --out FILE" in " ".join(missing.output.split())
    # Once the candidate's registry entry is (re)made, pairs answered before it judged other weights of that name.
    from zephyr.registry import ModelManifest

    folder = home / "models" / "cand"
    folder.mkdir(parents=True)
    (folder / "zephyr.json").write_text(ModelManifest(name="cand", method="dpo").model_dump_json())
    remade = CliRunner().invoke(app, [*gate, "--reviews", export("good.jsonl", 18, 12)])
    assert remade.exit_code == 1 and "all 30 pair(s) of cand against base were written by other weights" in " ".join(
        remade.output.split())


def test_a_gate_failure_within_noise_says_so_and_still_fails(home):
    from evals.results import EvalRun, ResultStore, measurement
    from zephyr.settings import Settings

    store = ResultStore(Settings(home=home).resolved_eval_results_dir)
    for model, looping, engine in (("base", 4, {}), ("cand", 6, {"engine_core": IN_PROCESS})):
        items = {f"q{i}": float(i < looping) for i in range(100)}
        store.save(EvalRun(model=model, suite="text", engine=engine,
                           measurements=[measurement("sciq_text", "looping", "test", items)]))
    result = CliRunner().invoke(app, ["eval", "gate", "--candidate", "cand", "--baseline", "base", "--suites", "text"])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "gate failed" in said
    assert "sciq_text/looping still holds zero, so the failure may be noise of 100 items" in said
    # the baseline's run predates reproducible reruns (no engine_core): the reader is told which model to rerun
    assert ("base's sciq_text/looping come from a run made before reruns gave the same answers; rerun `zephyr eval "
            "run --model base --suite text`") in said
    assert "cand's" not in said


def test_a_gate_failed_on_a_suite_asked_for_but_not_measured_says_why(home):
    """It exited 1 with no "gate failed" line: the reason was only in the table's caption."""
    from evals.results import EvalRun, ResultStore, measurement
    from zephyr.settings import Settings

    store = ResultStore(Settings(home=home).resolved_eval_results_dir)
    for model in ("base", "cand"):
        store.save(EvalRun(model=model, suite="mcq", measurements=[
            measurement("arc_easy", "mcq_acc_auto", "test", {f"q{i}": float(i < 60) for i in range(100)})]))
    result = CliRunner().invoke(app, ["eval", "gate", "--candidate", "cand", "--baseline", "base",
                                      "--suites", "mcq,gsm8k"])
    said = " ".join(result.output.split())
    assert result.exit_code == 1
    assert ("gate failed: --suites asked for gsm8k, where the two have no gating measurement in common; run `zephyr "
            "eval run --model NAME --suite gsm8k` for both, or pass --allow-missing") in said


def test_a_gate_on_too_few_items_or_a_benchmark_left_out_says_what_to_do(home):
    from evals.results import EvalRun, ResultStore, measurement
    from zephyr.settings import Settings

    store = ResultStore(Settings(home=home).resolved_eval_results_dir)
    store.save(EvalRun(model="base", suite="mcq", measurements=[
        measurement(b, "letter_acc", "test", {f"q{i}": 1.0 for i in range(40)}) for b in ("arc_easy", "sciq")]))
    store.save(EvalRun(model="cand", suite="mcq", measurements=[
        measurement("arc_easy", "letter_acc", "test", {f"q{i}": 1.0 for i in range(10)})]))
    gate = ["eval", "gate", "--candidate", "cand", "--baseline", "base", "--suites", "mcq"]
    result = CliRunner().invoke(app, gate)
    said = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "cand was not measured on sciq/letter_acc, which base was; run `zephyr eval run --model cand`" in said
    assert "arc_easy/letter_acc (10) compared over fewer than 30 common items" in said
    assert "is worse than" not in said  # no accuracy fell
    assert CliRunner().invoke(app, [*gate, "--allow-missing", "--min-items", "10"]).exit_code == 0


def test_calibrate_options_that_contradict_a_refit_or_are_empty_are_refused(home):
    result = CliRunner().invoke(app, ["eval", "calibrate", "--model", "m", "--no-letter", "--scores", "x.json"])
    assert result.exit_code == 1 and "--no-letter chooses what is scored" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["eval", "calibrate", "--model", "m", "--answer-prior-context", "A:",
                                      "--scores", "x.json"])
    assert result.exit_code == 1 and "with the cue saved in them" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["eval", "calibrate", "--model", "m", "--answer-prior-context", " "])
    assert result.exit_code == 1 and "must hold 1 to 200 characters" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["eval", "calibrate", "--model", "m", "--demonstrations", "3",
                                      "--scores", "x.json"])
    assert result.exit_code == 1 and "with the demonstrations saved in them" in " ".join(result.output.split())
    for count in ("-1", "17"):
        result = CliRunner().invoke(app, ["eval", "calibrate", "--model", "m", "--demonstrations", count])
        assert result.exit_code == 1 and "--demonstrations must be 0 to 16" in " ".join(result.output.split())
    # a refit reads every question saved: --benchmarks and --limit were ignored, and the record written anyway
    for extra in (["--benchmarks", "arc_easy"], ["--limit", "40"]):
        result = CliRunner().invoke(app, ["eval", "calibrate", "--model", "m", *extra, "--scores", "x.json"])
        assert result.exit_code == 1 and "--scores refits every question saved" in " ".join(result.output.split())


def test_a_server_serving_another_model_or_other_weights_is_refused(registered, monkeypatch):
    """`eval run --server` stored whatever the server answered under --model's name, and the gate then compared
    another model's answers as this one's (found by a review)."""
    import httpx

    from evals.run import EvalError, check_server
    from zephyr.registry import Registry

    entry = Registry(registered / "models").get("m")
    revision = entry.manifest.revision
    cards = {"other": {"id": "base", "revision": revision}, "stale": {"id": "m", "revision": "20200101T000000Z"},
             "same": {"id": "m", "revision": revision}}

    def answering(card):
        return lambda url, **_: httpx.Response(200, json={"object": "list", "data": [card]})

    for name, message in (("other", "serves 'base', not 'm'"), ("stale", "serves other weights of m")):
        monkeypatch.setattr(httpx, "get", answering(cards[name]))
        with pytest.raises(EvalError, match=message):
            check_server("http://127.0.0.1:8000", None, entry)
    monkeypatch.setattr(httpx, "get", answering(cards["same"]))
    check_server("http://127.0.0.1:8000", None, entry)


def test_server_answers_are_counted_against_in_process_ones_on_the_questions_both_answered(monkeypatch):
    """Through the server only (--no-local), the answers are compared with a stored in-process run, which may have
    answered other questions (another --limit): the count says on how many both answered."""
    from rich.console import Console

    from evals import mcq_eval, run
    from evals.results import Measurement

    def measured(metric: str, answers: dict[str, str]) -> Measurement:
        return Measurement(benchmark="arc_easy", metric=metric, split="test", n=len(answers), score=0.5,
                           items={i: 1.0 for i in answers}, seconds=1.0,
                           details={"answers": answers, "method": "letter"})

    served = {"letter": {"q0": "A", "q1": "B", "q2": "C"}, "auto": {"q0": "A", "q1": "C", "q2": "C"}}
    monkeypatch.setattr(mcq_eval, "via_server", lambda *_a, method, **_k: measured(f"{method}_server", served[method]))
    stored = [measured("letter_acc", {"q0": "A", "q1": "B", "q9": "D"}),  # q2 unanswered there, q9 not asked here
              measured("mcq_acc_auto", {"q0": "A", "q1": "B", "q2": "C"})]
    options = run.RunOptions(model="m", suite="mcq", server="http://x", local=False)
    out = run._mcq_server({"arc_easy": ("test", [])}, ["arc_easy"], options, Console(quiet=True), stored, stored=True)
    letter, auto = out
    assert (letter.details["same_answer_as_local"], letter.details["compared_with_local"]) == (2, 2)
    assert (auto.details["same_answer_as_local"], auto.details["compared_with_local"]) == (2, 3)
    alone = run._mcq_server({"arc_easy": ("test", [])}, ["arc_easy"], options, Console(quiet=True), [])
    assert all("same_answer_as_local" not in m.details for m in alone)  # nothing stored: nothing to compare
    for m in stored:  # stored answers to other questions under the same ids are not compared
        m.data_digest = {"arc_easy": "other"}
    elsewhere = run._mcq_server({"arc_easy": ("test", [])}, ["arc_easy"], options, Console(quiet=True), stored,
                                stored=True, fingerprints={"arc_easy": "this"})
    assert all("same_answer_as_local" not in m.details for m in elsewhere)
    same = run._mcq_server({"arc_easy": ("test", [])}, ["arc_easy"], options, Console(quiet=True), stored,
                           stored=True, fingerprints={"arc_easy": "other"})
    assert [m.details["compared_with_local"] for m in same] == [2, 3]


@pytest.mark.parametrize(("reward_model", "message"), [
    ("m", "'m' is a base model, not a reward model"),  # a registry entry that is not an RM: random scores
    ("{tmp}", "is not a model folder (no config.json)"),  # a folder, but no model in it
])
def test_a_reward_model_that_is_none_fails_before_the_engine(registered, monkeypatch, reward_model, message):
    from zephyr.settings import Settings

    monkeypatch.delenv("ZEPHYR_DATA_DIR")  # the shared benchmark data: the text suite reads it before the engine
    if not (Settings().data_dir / "gsm8k").is_dir():
        pytest.skip("the shared benchmark data is not on this machine")
    result = CliRunner().invoke(app, ["eval", "run", "--model", "m", "--suite", "text", "--limit", "2",
                                      "--reward-model", reward_model.format(tmp=registered)])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()) and "starting vLLM" not in result.output


def test_a_limited_run_records_the_whole_splits_fingerprint(tmp_path):
    from evals import run
    from offline import benchmarks
    from tests.unit.test_eval_datasets import write_arc
    from zephyr.settings import Settings

    path = write_arc(tmp_path / "arc.jsonl", [(f"q{i}", ["a", "b"], "A", None) for i in range(5)])
    whole, limited = {}, {}
    options = run.RunOptions(model="m", suite="mcq", sources={"arc_easy": str(path)})
    assert len(run._load("arc_easy", options, Settings(), whole)) == 5
    options.limit = 2
    assert [i.id for i in run._load("arc_easy", options, Settings(), limited)] == ["q0", "q1"]
    assert limited == whole == {"arc_easy": benchmarks.fingerprint(benchmarks.load("arc_easy", source=path))}


def test_gate_with_a_margin_names_the_rows_whose_interval_reaches_past_it(home):
    from evals.results import EvalRun, ResultStore, measurement
    from zephyr.settings import Settings

    store = ResultStore(Settings(home=home).resolved_eval_results_dir)
    for model, items in (("base", {f"q{i}": float(i < 60) for i in range(100)}),
                         ("cand", {f"q{i}": float(20 <= i < 80) for i in range(100)})):  # as many right, others
        store.save(EvalRun(model=model, suite="mcq", measurements=[measurement("arc_easy", "mcq_acc_auto", "test",
                                                                                 items)]))
    gate = ["eval", "gate", "--candidate", "cand", "--baseline", "base", "--suites", "mcq"]
    assert CliRunner().invoke(app, gate).exit_code == 0
    strict = CliRunner().invoke(app, [*gate, "--margin", "2"])
    said = " ".join(strict.output.split())
    assert strict.exit_code == 1 and "arc_easy/mcq_acc_auto reaches a drop" in said and "2-point margin" in said
    assert "by more than" not in said  # its point estimate is no drop at all


def test_eval_run_says_when_the_record_was_fitted_on_scores_of_another_dtype():
    """The service warns at start; `eval run` measured such a pairing in silence."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from evals.run import RunOptions, _mcq_suite
    from zephyr import mcq

    def said(record_dtype: str | None, engine_dtype: str) -> str:
        out = io.StringIO()
        record = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, dtype=record_dtype)
        _mcq_suite(SimpleNamespace(engine_info={"dtype": engine_dtype}), {}, [],
                   RunOptions(model="m", suite="mcq", letter=False, cloze=False), Console(file=out, width=400), record)
        return out.getvalue()

    assert "fitted on scores computed in float32, and this engine computes in bfloat16" in said("float32", "bfloat16")
    assert "fitted on scores" not in said("float32", "float32") + said(None, "bfloat16")


def test_the_safety_fit_refuses_a_regularization_strength_out_of_range(home):
    result = CliRunner().invoke(app, ["eval", "safety", "--c", "0"])
    assert result.exit_code == 2 and "--c" in result.output


def test_the_safety_fit_checks_where_it_writes_before_it_fits(home, monkeypatch):
    """A bad --record or --out failed only after the whole encoder fit, and the fitted record was lost."""
    from evals import safety

    monkeypatch.setattr(safety, "fit", lambda *a, **k: pytest.fail("fitted before the paths were checked"))
    blocker = home / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["eval", "safety", "--record", str(blocker / "guard.json")])
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["eval", "safety", "--record", str(home)])
    assert result.exit_code == 2 and "directory" in result.output


def test_a_run_through_a_server_names_the_server_not_the_local_engine(registered, monkeypatch, tmp_path):
    """The in-process run and the server's are saved apart: the server's rows must not carry the local engine's
    dtype (the gate notes rows computed in other dtypes), nor the in-process run claim a server."""
    from evals import engine as engine_module
    from evals import run
    from evals.results import measurement
    from tests.unit.test_eval_datasets import write_arc
    from zephyr.settings import Settings

    class LocalEngine:
        engine_info = {"dtype": "float32"}

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(engine_module, "EvalEngine", lambda *_a, **_k: LocalEngine())
    monkeypatch.setattr(run, "check_server", lambda *_a, **_k: None)
    monkeypatch.setattr(run, "_mcq_suite", lambda *_a, **_k: [
        measurement("arc_easy", "letter_acc", "test", {"q0": 1.0})])
    monkeypatch.setattr(run, "_mcq_server", lambda *_a, **_k: [
        measurement("arc_easy", "letter_acc_server", "test", {"q0": 1.0})])
    path = write_arc(tmp_path / "arc.jsonl", [("q0", ["a", "b"], "A", None)])
    options = run.RunOptions(model="m", suite="mcq", benchmarks=["arc_easy"], server="http://x",
                             sources={"arc_easy": str(path)})
    runs = run.run(options, Settings())
    assert [r.engine for r in runs] == [{"dtype": "float32"}, {"server": "http://x"}]
    assert [[m.metric for m in r.measurements] for r in runs] == [["letter_acc"], ["letter_acc_server"]]


def test_review_thresholds_without_reviews_are_refused(home):
    """A CI script that forgot --reviews got a gate that passed with no human check."""
    result = CliRunner().invoke(app, ["eval", "gate", "--candidate", "cand", "--baseline", "base",
                                      "--min-win-rate", "0.99", "--min-review-pairs", "1000"])
    assert result.exit_code == 1 and "give them with --reviews FILE" in " ".join(result.output.split())


def test_a_results_folder_that_cannot_be_written_fails_before_any_data_or_engine(registered, monkeypatch):
    """`store.save` raised OSError as a traceback after the engine's work (up to an hour of scoring lost)."""
    blocked = registered / "not-a-folder"
    blocked.write_text("a file where the results folder should be")
    monkeypatch.setenv("ZEPHYR_EVAL_RESULTS_DIR", str(blocked))
    result = CliRunner().invoke(app, ["eval", "run", "--model", "m", "--suite", "mcq", "--limit", "2"])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "cannot write the results to" in said and "ZEPHYR_EVAL_RESULTS_DIR" in said
    assert "starting vLLM" not in said and "does not exist" not in said  # before the data is read
