"""Speed records (evals.results.SpeedRecord): what loadtest.variants writes, what the report reads, and the files
older versions wrote, which must keep reading."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from evals.results import EvalRun, ResultStore, SpeedRecord

# A speed run as loadtest.variants wrote it before sessions were named (untyped dict, integer TTFTs), and one of
# a named session: files like these lie in ~/.cache/zephyr/eval-results/<model>/runs/.
OLD_SPEED = {"tok_per_s": {"1": 30.5, "8": 186.1}, "ttft_p50_ms": {"1": 41, "8": 95},
             "latency_p50_s": {"1": 2.1, "8": 2.9}, "latency_p95_s": {"1": 2.3, "8": 3.4},
             "rss_peak_bytes": 2130500000, "rss_idle_bytes": 1950000030.5, "cold_start_s": 41.3}
NEW_SPEED = {**OLD_SPEED, "session": "20261121T100000-4242"}


def run_file(model: str, created_at: str, speed: dict, suite: str = "speed") -> str:
    return json.dumps({"model": model, "parent": "base", "method": "w8a8", "suite": suite, "created_at": created_at,
                       "limit": None, "size_bytes": 170000000, "quantization": None,
                       "engine": {"server": "zephyr serve", "rounds": 2}, "speed": speed, "measurements": []}, indent=1)


def write(store: ResultStore, model: str, name: str, text: str) -> None:
    folder = store.folder(model) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


@pytest.mark.parametrize("speed", [OLD_SPEED, NEW_SPEED], ids=["before-sessions", "with-session"])
def test_files_written_before_the_typed_record_still_parse(speed):
    run = EvalRun.model_validate_json(run_file("m", "2026-11-21T10:00:00Z", speed))
    record = run.speed
    assert record.tok_per_s == {"1": 30.5, "8": 186.1} and record.ttft_p50_ms == {"1": 41.0, "8": 95.0}
    assert record.rss_peak_bytes == 2130500000 and record.rss_idle_bytes == 1950000030.5
    assert record.cold_start_s == 41.3 and record.levels() == ["1", "8"] and record.recorded
    assert record.session == speed.get("session") and record.measured_at is None
    # Saved again, the record holds the same figures under the same names, nothing added.
    assert json.loads(run.model_dump_json())["speed"] == speed


def test_runs_without_speed_keep_an_empty_record_on_disk(tmp_path):
    run = EvalRun.model_validate_json(run_file("m", "2026-11-21T10:00:00Z", {}, suite="mcq"))
    assert not run.speed.recorded and run.speed.levels() == []
    path = ResultStore(tmp_path).save(EvalRun(model="m", suite="mcq"))
    assert json.loads(path.read_text())["speed"] == {}


def test_a_figure_the_model_does_not_name_is_kept():
    run = EvalRun.model_validate_json(run_file("m", "2026-11-21T10:00:00Z", {**NEW_SPEED, "gpu_util": 0.5}))
    assert json.loads(run.model_dump_json())["speed"]["gpu_util"] == 0.5


def test_latest_takes_the_newest_record_without_an_older_session(tmp_path):
    store = ResultStore(tmp_path)
    # An old sessionless record with a figure the newer one lacks, then a named session's record.
    write(store, "m", "speed-1.json", run_file("m", "2026-11-21T10:00:00Z", {**OLD_SPEED, "session": "old",
                                                                           "tok_per_s": {"1": 99.0}}))
    newer = {k: v for k, v in NEW_SPEED.items() if k != "cold_start_s"}
    write(store, "m", "speed-2.json", run_file("m", "2026-11-22T10:00:00Z", newer))
    write(store, "m", "mcq-3.json", run_file("m", "2026-11-23T10:00:00Z", {}, suite="mcq"))
    speed = store.latest("m").speed
    assert speed.tok_per_s == {"1": 30.5, "8": 186.1} and speed.session == "20261121T100000-4242"
    assert speed.cold_start_s == 41.3  # kept from the older record
    assert speed.measured_at == datetime(2026, 11, 22, 10, tzinfo=UTC)  # the run that recorded it, not the mcq run
    # A newer record without a session does not inherit the older one's.
    write(store, "m", "speed-4.json", run_file("m", "2026-11-24T10:00:00Z", OLD_SPEED))
    assert store.latest("m").speed.session is None


def test_same_session():
    at = datetime(2026, 11, 21, 10, tzinfo=UTC)
    named = SpeedRecord(session="s1", measured_at=at)
    assert named.same_session(SpeedRecord(session="s1", measured_at=at + timedelta(days=3)))
    assert not named.same_session(SpeedRecord(session="s2", measured_at=at))
    # Records from before sessions were named pair when saved within two minutes of each other (one id is not enough).
    assert SpeedRecord(measured_at=at).same_session(SpeedRecord(session="s1", measured_at=at + timedelta(seconds=90)))
    assert not SpeedRecord(measured_at=at).same_session(SpeedRecord(measured_at=at + timedelta(minutes=3)))
    assert not SpeedRecord(measured_at=at).same_session(SpeedRecord())
    assert not SpeedRecord(measured_at=at).same_session(SpeedRecord(measured_at=datetime(2026, 11, 21, 10)))


def test_variants_summarise_writes_the_record_the_report_reads():
    from loadtest.bench import Level
    from loadtest.variants import summarise

    levels = [Level("m", concurrency=c, requests=4, wall_s=2.0, output_tokens=t, ttft_s=[0.04, 0.05],
                    latency_s=[2.0, 2.2]) for c, t in ((1, 60), (8, 360), (1, 62), (8, 380))]
    memory = [{"rss_peak_bytes": 2_000_000_000, "rss_idle_bytes": 1_900_000_000, "cold_start_s": 40.04},
              {"rss_peak_bytes": 2_100_000_000, "rss_idle_bytes": 1_900_000_001, "cold_start_s": 42.0}]
    speed = summarise(levels, memory)
    assert isinstance(speed, SpeedRecord)
    assert speed.tok_per_s == {"1": 30.5, "8": 185.0} and speed.levels() == ["1", "8"]
    assert speed.rss_peak_bytes == 2_100_000_000 and speed.cold_start_s == 41.0
    saved = json.loads(EvalRun(model="m", suite="speed", speed=speed.model_copy(update={"session": "s"}))
                       .model_dump_json())["speed"]
    assert list(saved) == [*OLD_SPEED, "session"]  # the names and order the untyped writer used


def test_bench_asks_our_server_every_question_once_and_twins_the_same_questions():
    """A question asked twice is read from the prefix cache: each of our MCQ paths gets new questions each round,
    and each vllm serve twin gets its path's questions, so their answers can be compared."""
    from loadtest.bench import GROUPS, MCQ_PATHS, WARMUP_QUESTIONS, round_questions

    questions, per_path, rounds = list(range(WARMUP_QUESTIONS + GROUPS * 2 * 5)), 5, 2
    ours = [label for label, (target, _) in MCQ_PATHS.items() if target == "zephyr"]
    asked = [q for r in range(rounds) for label in ours for q in round_questions(questions, per_path, r, label)]
    assert len(asked) == len(set(asked)) == 30 and min(asked) == WARMUP_QUESTIONS  # disjoint, after the warm-up
    for r in range(rounds):
        cloze, letter, vllm_cloze, vllm_letter = (round_questions(questions, per_path, r, label) for label in (
            "zephyr /mcq cloze", "zephyr /mcq letter", *[label for label in MCQ_PATHS if label.startswith("vllm")]))
        assert vllm_cloze == cloze and vllm_letter == letter and len(cloze) == per_path


def test_logging_cost_is_the_mean_paired_difference_as_a_share_of_the_log_off_mean():
    from loadtest.bench import logging_summary

    rows = [{"route": "chat", "question": i, "log on": on, "log off": off}
            for i, (on, off) in enumerate([(1.10, 1.00), (1.02, 1.00), (0.98, 1.00), (2.06, 2.00)])]
    rows.append({"route": "mcq", "question": 0, "log on": 9.0, "log off": 1.0})  # another route: not counted
    s = logging_summary(rows, "chat")
    # Differences 0.10, 0.02, -0.02, 0.06: mean 0.04 over a log-off mean of 1.25, i.e. +3.2%.
    assert s["pairs"] == 4 and s["delta_s"] == pytest.approx(0.04) and s["cost"] == pytest.approx(0.032)
    low, high = s["delta_ci_s"]
    assert low < 0.04 < high and s["cost_ci"] == (pytest.approx(low / 1.25), pytest.approx(high / 1.25))
    assert s["p50_off_s"] == pytest.approx(1.0)
