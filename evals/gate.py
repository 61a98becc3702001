"""The regression gate: does a candidate model lose more than `max_drop` points against a baseline?

Only measurements both models have are compared, and only over the item ids both were measured on, so a
`--limit` run is compared with the matching part of a full run, never with a different sample."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from evals.preference import by_these_weights, human_win_rates, read_export, read_review_records
from evals.results import (  # the metric vocabulary (is_share, scale_of, ...) is the results' own
    GSM8K_MODES,
    SERVED_METRICS,
    SUITE_BENCHMARKS,
    EvalRun,
    Measurement,
    ResultStore,
    chosen_sources,
    is_share,
    lower_is_better,
    merge_runs,
    same_judge,
    scale_of,
    suite_of,
)
from evals.stats import PairedDelta, paired_bootstrap
from offline.engine import IN_PROCESS
from zephyr.registry import ModelManifest, check_name

# The accuracy suites, and the text suite's shares: answers that loop, SciQ chat answers that name the key and those
# that name a distractor. Its other text metrics (BERTScore, the reward model's score, answer lengths) have no natural
# "points" and are shown for information.
DEFAULT_SUITES = ("mcq", "gsm8k", "text")
TEXT_GATING_METRICS = ("looping", "names_key", "names_distractor")
# Reviewers' A/B rule: enough decisive pairs, and a 95% interval of the candidate's win rate whose lower bound clears
# the threshold. 0.4 is non-inferiority: promotion only when reviewers do not prefer the baseline by more than 60:40.
DEFAULT_MIN_REVIEW_PAIRS = 30
DEFAULT_MIN_WIN_RATE = 0.4
# A gating row compared over fewer common items than this fails: a run of a handful of questions cannot show a drop,
# and its interval looks narrow. `--min-items` lowers it for smoke tests.
DEFAULT_MIN_ITEMS = 30
# How likely an option's text is with no question: a baseline of the data, never a method the service answers by.
NEVER_GATING_METRICS = ("answer_prior_acc",)
# A delta of exactly -max_drop must pass; float subtraction (0.51 - 0.52) lands a hair below it.
_TOLERANCE = 1e-9


class GateError(Exception):
    """The gate cannot be evaluated; the message says what to run or change."""


@dataclass(frozen=True)
class CompareRow:
    """One measurement compared over the common items; values are in display units (points for shares)."""

    benchmark: str
    metric: str
    n: int  # common item ids
    n_baseline: int
    n_candidate: int
    baseline: float
    candidate: float
    delta: float
    low: float
    high: float
    share: bool

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.metric}"


@dataclass(frozen=True)
class GateRow(CompareRow):
    passed: bool = True
    gating: bool = True  # False: shown for information, the served method decides this benchmark
    too_few: bool = False  # compared over fewer common items than the gate's minimum: failed whatever its delta
    past_drop: bool = False  # its point estimate falls (rises, where less is better) by more than max_drop
    past_margin: bool = False  # its 95% interval reaches past the non-inferiority margin (`check(margin=...)`)

    @property
    def spans_zero(self) -> bool:
        """The 95% interval holds "no change": a failure on this row may be sampling noise (the verdict stands;
        more items narrow the interval)."""
        return self.low <= 0.0 <= self.high


def compare_measurements(
    candidate: Measurement, baseline: Measurement, *, iters: int = 10_000, seed: int = 0, level: float = 0.95
) -> CompareRow:
    """Candidate minus baseline over the common ids; ValueError when they have none or no finite values."""
    if candidate.split != baseline.split:
        raise ValueError(f"measured on different splits ({baseline.split} vs {candidate.split})")
    paired: PairedDelta = paired_bootstrap(candidate.items, baseline.items, iters=iters, seed=seed, level=level)
    common = candidate.items.keys() & baseline.items.keys()
    scale = scale_of(candidate.metric)
    base = sum(baseline.items[k] for k in common) / len(common)
    cand = sum(candidate.items[k] for k in common) / len(common)
    return CompareRow(
        benchmark=candidate.benchmark,
        metric=candidate.metric,
        n=paired.n,
        n_baseline=baseline.n,
        n_candidate=candidate.n,
        baseline=base * scale,
        candidate=cand * scale,
        delta=paired.delta * scale,
        low=paired.low * scale,
        high=paired.high * scale,
        share=is_share(candidate.metric),
    )


def compare_runs(
    candidate: EvalRun, baseline: EvalRun, suites: list[str] | tuple[str, ...] | None = None, *,
    unlike_prompts: dict[str, str] | None = None, **bootstrap: Any
) -> tuple[list[CompareRow], dict[str, str]]:
    """Rows for every key both runs have (in the given suites, all when None), and the keys that could not be
    compared with the reason (no common ids, different splits, other conditions). Keys whose options were scored
    after other prompts (`different_prompts`) go to `unlike_prompts` where it is given (key -> why), so a caller
    can tell rows no verdict rests on from those it does."""
    rows: list[CompareRow] = []
    problems: dict[str, str] = {}
    other_data: dict[str, list[str]] = {}  # why -> the keys it holds for: one clause for a benchmark's metrics
    for m in _ordered(candidate.measurements):
        if suites is not None and suite_of(m.benchmark) not in suites:
            continue
        other = baseline.get(m.key)
        if other is None or not same_judge(m, other):
            continue
        if why := different_data(m, other, candidate.data, baseline.data) or different_conditions(m, other):
            other_data.setdefault(why, []).append(m.key)
            continue
        if why := different_prompts(m, other):
            if unlike_prompts is not None:
                unlike_prompts[m.key] = why
            else:
                other_data.setdefault(why, []).append(m.key)
            continue
        try:
            rows.append(compare_measurements(m, other, **bootstrap))
        except ValueError as exc:
            problems[m.key] = str(exc)
    problems |= {", ".join(keys): why for why, keys in other_data.items()}
    return rows, problems


def different_data(candidate: Measurement, baseline: Measurement, candidate_data: dict[str, str],
                   baseline_data: dict[str, str]) -> str | None:
    """Why two measurements are not of the same questions (a digest of data both read differs), or None; a
    measurement saved before digests were recorded is taken on trust."""
    for name in sorted(candidate.data_digest.keys() & baseline.data_digest.keys()):
        ours, theirs = candidate.data_digest[name], baseline.data_digest[name]
        if ours != theirs:
            fix = ("the same ZEPHYR_DATA_DIR: GSM8K's examples are always read there" if name == "gsm8k:train"
                   else f"`--data {name}=FILE`, or the same ZEPHYR_DATA_DIR")
            return (f"the two read different {name} items (candidate: {candidate_data.get(name, '?')}, digest "
                    f"{ours}; baseline: {baseline_data.get(name, '?')}, digest {theirs}); measure both on the same "
                    f"data ({fix})")
    return None


def different_conditions(candidate: Measurement, baseline: Measurement) -> str | None:
    """Why two generated measurements are not alike (other token limits or system prompt), or None; runs from before
    conditions were recorded (2026-12-06) are taken on trust."""
    ours, theirs = candidate.details.get("conditions"), baseline.details.get("conditions")
    if ours is None or theirs is None or ours == theirs:
        return None
    differ = ", ".join(f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in sorted(ours.keys() | theirs.keys())
                       if ours.get(k) != theirs.get(k))
    return (f"the answers were generated under other conditions (candidate vs baseline: {differ}); measure both "
            "with the same --gsm8k-max-tokens and ZEPHYR_SYSTEM_PROMPT")


PROMPTED_METRIC_PREFIXES = ("cloze_acc", "answer_prior_acc")  # options scored after a record's prompts


def different_prompts(candidate: Measurement, baseline: Measurement) -> str | None:
    """Why two option-scoring measurements (cloze, the answer prior) read their options after other prompts, or
    None: each model's calibration record gives the demonstrations and answer cue its options are scored after, so a
    child with no record of its own (quantized, trained) is scored zero-shot where its parent is scored after five
    demonstrations. Their difference would mix the prompts' effect into the weights'. The served method's rows are
    not asked: each model's is what it serves, by design."""
    if not candidate.metric.startswith(PROMPTED_METRIC_PREFIXES):
        return None

    def shown(details: dict[str, Any], name: str) -> str:
        value = details.get(name)
        return f"sha256 {hashlib.sha256(value.encode()).hexdigest()[:8]}" if value else "none"

    differ = [f"{label} {shown(candidate.details, name)} vs {shown(baseline.details, name)}"
              for name, label in (("demonstrations", "demonstrations"), ("context", "answer cue"))
              if (name != "context" or {"context"} <= candidate.details.keys() & baseline.details.keys())
              and (candidate.details.get(name) or None) != (baseline.details.get(name) or None)]
    if not differ:
        return None
    return (f"the options were scored after other prompts (candidate vs baseline: {'; '.join(differ)}), as each "
            "model's calibration record gives them; compare the served method's rows, or calibrate both")


_BENCHMARK_ORDER = [b for names in SUITE_BENCHMARKS.values() for b in names]


def order_key(benchmark: str, metric: str = "") -> tuple[int, str, str]:
    """Suite order of results.SUITE_BENCHMARKS, then name: tables read the same for every model."""
    rank = _BENCHMARK_ORDER.index(benchmark) if benchmark in _BENCHMARK_ORDER else len(_BENCHMARK_ORDER)
    return rank, benchmark, metric


def _ordered(measurements: list[Measurement]) -> list[Measurement]:
    return sorted(measurements, key=lambda m: order_key(m.benchmark, m.metric))


@dataclass(frozen=True)
class ReviewGate:
    """What reviewers said in blind pairs of the candidate's answer against the baseline's (`zephyr review export
    --format dpo`: ties and both-bad verdicts never become pairs, so every pair is decisive)."""

    source: str
    wins: int  # pairs reviewers decided for the candidate
    losses: int
    ci95: tuple[float, float] | None  # Wilson interval of wins / n
    min_pairs: int
    min_win_rate: float
    stale: int = 0  # pairs of the two left out: other weights of either name wrote them

    @property
    def n(self) -> int:
        return self.wins + self.losses

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.n if self.n else None

    @property
    def passed(self) -> bool:
        return self.n >= self.min_pairs and self.ci95 is not None and self.ci95[0] >= self.min_win_rate - _TOLERANCE

    @property
    def reason(self) -> str:
        if self.n < self.min_pairs:
            return f"{self.n} decisive review pairs, fewer than the {self.min_pairs} required" + self._stale_note
        low, high = self.ci95 or (0.0, 0.0)
        clears = "clears" if self.passed else "is below"
        return (f"reviewers preferred the candidate in {self.wins} of {self.n} pairs ({self.win_rate:.1%}, 95% CI "
                f"[{low:.1%}, {high:.1%}]); the lower bound {clears} {self.min_win_rate:.0%}" + self._stale_note)

    @property
    def _stale_note(self) -> str:
        return (f" ({self.stale} pair(s) left out: written by other weights of either name, before a model was "
                "remade under it)" if self.stale else "")


def review_gate(reviews: Any, candidate: str, baseline: str, *, min_pairs: int = DEFAULT_MIN_REVIEW_PAIRS,
                min_win_rate: float = DEFAULT_MIN_WIN_RATE, source: str = "",
                entries: Mapping[str, ModelManifest] | None = None) -> ReviewGate:
    """The head-to-head pairs of CANDIDATE and BASELINE in exported reviews (an export file's path, or its records);
    GateError when the file cannot be read, the rule's bounds are out of range or the export holds no pair between
    the two models.

    `entries` holds the two models' registry manifests: reviews name models by name, so the pairs other weights of
    either name wrote (before it was remade under that name) are left out (`stale`; preference.by_these_weights)."""
    from offline.stats import wilson

    if min_pairs < 1:
        raise GateError(f"the minimum number of review pairs must be at least 1, got {min_pairs}")
    if not 0.0 <= min_win_rate <= 1.0:
        raise GateError(f"the minimum win rate is a share in [0, 1], got {min_win_rate}")
    if candidate == baseline:
        raise GateError("reviews compare two models: the candidate and the baseline must differ")
    is_file = isinstance(reviews, str | Path)
    source = source or (str(reviews) if is_file else "")
    try:
        records = read_review_records(Path(reviews)) if is_file else read_export(reviews)
    except ValueError as exc:
        raise GateError(f"--reviews: {exc}") from None
    a, b = sorted((candidate, baseline))
    current, _ = by_these_weights(records, entries or {})
    result = human_win_rates(current)
    if filtered := result.get("from_filtered_export"):
        # A default export drops the pairs a flagged answer won, and those with an answer cut off: the wins of the
        # model whose answers reviewers flag more would go with them, tilting the rate it is gated on.
        raise GateError(f"{source or 'the reviews'}: {filtered} pair(s) come from an export that left out others; "
                        "export with `zephyr review export --format dpo --include-flagged --include-unfinished` "
                        "(no --min-agreement), which keeps every complete item's decisive verdict, and give the "
                        "export itself, not a training file `zephyr data review` or `data clean` made of it")
    match = next((h for h in result["head_to_head"] if (h["a"], h["b"]) == (a, b)), None)
    stale = _pairs_between(records, a, b) - (match["n"] if match else 0)
    if match is None and stale:
        revisions = ", ".join(f"{name} {entry.revision}" for name, entry in sorted((entries or {}).items()))
        raise GateError(
            f"{source or 'the reviews'}: all {stale} pair(s) of {candidate} against {baseline} were written by other "
            f"weights of these names than this registry's ({revisions}). Run the gate with the registry the servers "
            "served from (ZEPHYR_HOME), or serve both models as they are now, review again and export")
    if match is None:
        seen = sorted({f"{h['a']} vs {h['b']}" for h in result["head_to_head"]})
        raise GateError(
            f"{source or 'the reviews'} hold no pair of {candidate} against {baseline} (pairs seen: "
            f"{', '.join(seen) or 'none'}). Serve {baseline} with ZEPHYR_REVIEW_CANDIDATE=remote, "
            f"ZEPHYR_REVIEW_CANDIDATE_URL at a server of {candidate} and ZEPHYR_REVIEW_CANDIDATE_MODEL={candidate}; "
            "then review and export with `zephyr review export --format dpo --include-flagged --include-unfinished`")
    wins = match["a_wins"] if a == candidate else match["b_wins"]
    losses = match["n"] - wins
    return ReviewGate(source=source, wins=wins, losses=losses, ci95=wilson(wins, match["n"]), min_pairs=min_pairs,
                      min_win_rate=min_win_rate, stale=stale)


def _pairs_between(records: list[dict[str, Any]], a: str, b: str) -> int:
    return next((h["n"] for h in human_win_rates(records)["head_to_head"] if (h["a"], h["b"]) == (a, b)), 0)


@dataclass
class GateResult:
    candidate: str
    baseline: str
    max_drop: float
    suites: list[str]
    rows: list[GateRow]
    skipped: list[str] = field(default_factory=list)  # keys only one of the two models has
    # keys both have that no row compares, with why (options scored after other prompts, or other judges)
    not_comparable: dict[str, str] = field(default_factory=dict)
    reviews: ReviewGate | None = None  # reviewers' A/B, when the gate was asked to require it
    # per model, the compared rows whose generated answers a rerun would not repeat (unreproducible_rows)
    unreproducible: dict[str, list[str]] = field(default_factory=dict)
    # The baseline's gating measurements of benchmarks the candidate has no gating measurement for: a benchmark left
    # unmeasured must not pass by default.
    missing: list[str] = field(default_factory=list)
    allow_missing: bool = False
    min_items: int = DEFAULT_MIN_ITEMS
    # Suites asked for that no gating row stands for (neither model, or only one, was measured on them); they fail
    # the gate when asked by name (`--suites`), and are named in the caption when they were the default.
    unmeasured: list[str] = field(default_factory=list)
    suites_asked: bool = False
    margin: float | None = None  # non-inferiority: no gating row's 95% interval may reach past it
    # gating rows whose two measurements were computed in other dtypes (a machine with AMX serves bfloat16, one
    # without float32): a difference of numerics, not of models, may be in the delta (unlike_dtypes)
    unlike_dtypes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (all(row.passed for row in self.rows if row.gating) and (self.reviews is None or self.reviews.passed)
                and (self.allow_missing or not self.missing)
                and (self.allow_missing or not self.suites_asked or not self.unmeasured))

    @property
    def too_few(self) -> list[GateRow]:
        return [row for row in self.rows if row.gating and row.too_few]

    @property
    def failures(self) -> list[GateRow]:
        return [row for row in self.rows if row.gating and not row.passed]

    @property
    def past_margin(self) -> list[GateRow]:
        """Failed rows whose 95% interval reaches past the margin: a drop that large cannot be ruled out."""
        return [row for row in self.failures if row.past_margin and not row.too_few]

    @property
    def failures_within_noise(self) -> list[GateRow]:
        """Failed rows whose interval still holds zero: the point estimate is past max_drop, the data cannot yet
        tell it from no change."""
        return [row for row in self.failures if row.spans_zero and not row.too_few and row.past_drop]

    def rerun_suites(self, model: str) -> list[str]:
        """The suites whose rerun replaces `model`'s unreproducible rows."""
        keys = set(self.unreproducible.get(model, []))
        return sorted({suite_of(row.benchmark) for row in self.rows if row.key in keys})

    def table(self) -> Table:
        verdict = "[green]PASS[/]" if self.passed else "[red]FAIL[/]"
        table = Table(
            title=f"Gate {verdict}: {self.candidate} (candidate) vs {self.baseline} (baseline), "
            f"max drop {self.max_drop:g} pts"
            + (f", 95% interval within {self.margin:g} pts" if self.margin is not None else "")
            + f", gated on {', '.join(s for s in self.suites if s not in self.unmeasured)}",
            caption="scores over the items both models were measured on; delta with 95% paired bootstrap CI"
            + (f"; only one model has: {', '.join(self.skipped)}" if self.skipped else "")
            + "".join(f"\nnot compared, {key}: {why}" for key, why in self.not_comparable.items())
            + (f"\nthe candidate was not measured on the baseline's {', '.join(self.missing)}"
               + (" (allowed)" if self.allow_missing else " (FAIL)") if self.missing else "")
            + (f"\nno gating measurement of both models in suite(s) {', '.join(self.unmeasured)}"
               + (" (allowed)" if self.allow_missing else " (FAIL: asked by --suites)" if self.suites_asked
                  else " (not asked by --suites, so not required)") if self.unmeasured else "")
            + (f"\nfewer than {self.min_items} common items (FAIL): {', '.join(r.key for r in self.too_few)}"
               if self.too_few else "")
            + (f"\nhuman review ({'PASS' if self.reviews.passed else 'FAIL'}): {self.reviews.reason}"
               if self.reviews else ""),
        )
        for name, justify in (
            ("benchmark", "left"),
            ("metric", "left"),
            ("n", "right"),
            ("baseline", "right"),
            ("candidate", "right"),
            ("delta (pts)", "right"),
            ("verdict", "center"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for row in self.rows:
            metric = row.metric if row.share else f"{row.metric} (raw units)"
            n = (
                f"{row.n}"
                if row.n == row.n_baseline == row.n_candidate
                else (f"{row.n} common ({row.n_baseline} / {row.n_candidate})")
            )
            # Text cells: "[-1.2, +0.4]" would otherwise be read as rich markup.
            table.add_row(
                Text(row.benchmark),
                Text(metric),
                Text(n),
                Text(fmt_value(row.baseline, row.share)),
                Text(fmt_value(row.candidate, row.share)),
                Text(fmt_delta(row.delta, row.low, row.high, row.share)),
                Text("info", style="dim") if not row.gating else
                Text("PASS", style="green") if row.passed else Text("FAIL", style="bold red"),
            )
        return table


def fmt_value(value: float, share: bool) -> str:
    return f"{value:.1f}" if share else f"{value:.3f}"


def fmt_delta(delta: float, low: float, high: float, share: bool) -> str:
    digits = 1 if share else 3
    return f"{delta:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _within(row: CompareRow, max_drop: float) -> bool:
    """A share where less is better (looping answers, answers naming a distractor) may rise by max_drop points; every
    other metric may fall by as much."""
    if lower_is_better(row.metric):
        return row.delta <= max_drop + _TOLERANCE
    return row.delta >= -max_drop - _TOLERANCE


def _gate_row(row: CompareRow, max_drop: float, min_items: int, margin: float | None, gating: bool) -> GateRow:
    """The row's verdict: it passes unless one of its three failures holds."""
    past_drop, too_few, past_margin = not _within(row, max_drop), row.n < min_items, _past_margin(row, margin)
    return GateRow(**vars(row), passed=not (past_drop or too_few or past_margin), gating=gating, too_few=too_few,
                   past_drop=past_drop, past_margin=past_margin)


def _past_margin(row: CompareRow, margin: float | None) -> bool:
    """Whether the row's 95% interval reaches a drop (or, where less is better, a rise) beyond `margin`: the
    non-inferiority reading of "no benchmark may drop significantly", which a point estimate alone cannot give."""
    if margin is None:
        return False
    if lower_is_better(row.metric):
        return row.high > margin + _TOLERANCE
    return row.low < -margin - _TOLERANCE


GSM8K_METRICS = frozenset(f"exact_match_{mode}" for mode in GSM8K_MODES)


def _gates(benchmark: str, metric: str, served: set[str]) -> bool:
    suite = suite_of(benchmark)
    if suite == "text":
        return metric in TEXT_GATING_METRICS
    if metric in NEVER_GATING_METRICS:
        return False
    return suite != "mcq" or benchmark not in served or metric in SERVED_METRICS


def stale_served_rows(store: ResultStore, model: str, run: EvalRun, suites: list[str]) -> list[str]:
    """`model`'s served (`auto`) measurements in `suites`, in process or through a server, computed under another
    calibration record than the one its registry entry holds now (a `zephyr eval calibrate` since): the service no
    longer answers as they did."""
    from zephyr import mcq

    if store.registry is None or not store.registry.exists(model):
        return []
    record = store.registry.get(model).manifest.mcq_calibration
    now = mcq.plan("auto", record)
    stale = []
    for m in run.measurements:
        if m.metric not in SERVED_METRICS or suite_of(m.benchmark) not in suites:
            continue
        if "record_created_at" in m.details:  # runs since 2026-12-03 name their record (a server's since 12-06)
            if m.details["record_created_at"] != (record.created_at.isoformat() if record else None):
                stale.append(m.key)
        elif (m.metric == SERVED_METRICS[0] and "method" in m.details
              and (m.details["method"], m.details.get("weights")) != (now.method, now.weights)):
            stale.append(m.key)  # an in-process one that names neither (made by hand) cannot be told stale
    return stale


def check(
    store: ResultStore,
    candidate: str,
    baseline: str,
    max_drop: float = 1.0,
    suites: list[str] | None = None,
    *,
    iters: int = 10_000,
    seed: int = 0,
    reviews: ReviewGate | None = None,
    min_items: int = DEFAULT_MIN_ITEMS,
    allow_missing: bool = False,
    margin: float | None = None,
) -> GateResult:
    """Fail a row when candidate - baseline < -max_drop (points for share metrics, the metric's own units
    otherwise), or > +max_drop points for a share where less is better (looping answers, chat answers naming a
    distractor), judged on the point estimate; the CI is shown so a reader can tell noise from a real drop. An MCQ
    benchmark both models have /mcq's served method for is judged on that method alone; of the text suite, only
    TEXT_GATING_METRICS gate. A gating row over fewer than `min_items` common items fails, and so does the gate when
    the baseline has a gating measurement of a benchmark the candidate was not measured on (unless
    `allow_missing`). With `margin`, a gating row also fails when its 95% interval reaches a drop (a rise, where less
    is better) beyond it: non-inferiority, which wide intervals (few items) fail."""
    if min_items < 1:
        raise GateError(f"the minimum number of common items must be at least 1, got {min_items}")
    if not 0 <= max_drop < float("inf"):  # negative demanded a gain on every row; NaN failed every row
        raise GateError(f"the allowed drop is a finite number of points, 0 or more, got {max_drop}")
    if margin is not None and not margin > 0:
        raise GateError(f"the non-inferiority margin must be above 0 points, got {margin}")
    if candidate == baseline:  # every delta would be 0 and the gate pass: a typo would promote anything
        raise GateError(f"the candidate and the baseline are both {candidate!r}; compare two models")
    asked = bool(suites)
    suites = list(suites) if suites else list(DEFAULT_SUITES)
    unknown = [s for s in suites if s not in SUITE_BENCHMARKS]
    if unknown:
        raise GateError(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITE_BENCHMARKS)}")
    for name in (candidate, baseline):  # both are result paths: a bad name fails before either is read
        check_name(name)
    history = {name: store.runs(name) for name in (candidate, baseline)}  # each model's files, read once
    runs: dict[str, EvalRun] = {}
    for name in (candidate, baseline):
        run = merge_runs(history[name])
        if run is None:
            raise GateError(
                f"no eval results for {name!r} in {store.root}: run `zephyr eval run --model {name} --suite "
                f"{suites[0]}` first" + "".join(f" (and `--suite {s}`)" for s in suites[1:])
            )
        runs[name] = run
    cand_run, base_run = runs[candidate], runs[baseline]
    for name in (candidate, baseline):
        stale = stale_served_rows(store, name, runs[name], suites)
        if stale:
            raise GateError(
                f"{name}'s {', '.join(stale)} were measured under another /mcq calibration record than the one it "
                f"serves now (recalibrated since); rerun `zephyr eval run --model {name} --suite mcq` first, on at "
                f"least as many questions (a smaller --limit run does not replace a larger one)")
    unlike_prompts: dict[str, str] = {}
    compared, problems = compare_runs(cand_run, base_run, suites, unlike_prompts=unlike_prompts, iters=iters,
                                      seed=seed)
    # Where both models have /mcq's default method for a benchmark, it alone decides that benchmark's verdict (the
    # other formats are shown for information).
    served = {row.benchmark for row in compared if row.metric in SERVED_METRICS}
    # Options scored after other prompts cannot stand for a benchmark's verdict; beside its served method, whose
    # verdict it is, they are left out (listed as skipped).
    for key, why in unlike_prompts.items():
        benchmark, _, metric = key.partition("/")
        if _gates(benchmark, metric, served):
            problems[key] = why
    # A row the verdict does not rest on (the reward model's score) that cannot be compared, empty or on other
    # data, is listed as not compared, not a refusal of the whole gate.
    info_problems = {key: why for key, why in problems.items()
                     if not any(_gates(*part.partition("/")[::2], served) for part in key.split(", "))}
    problems = {key: why for key, why in problems.items() if key not in info_problems}
    if problems:
        lines = "; ".join(f"{key}: {why}" for key, why in problems.items())
        raise GateError(
            f"cannot compare {candidate} with {baseline} on {lines}. Re-run the older one on the same split and data "
            f"(`zephyr eval run --model NAME --suite SUITE`)"
        )
    if not compared:
        have = {
            name: sorted(m.key for m in run.measurements if suite_of(m.benchmark) in suites)
            for name, run in runs.items()
        }
        raise GateError(
            f"{candidate} and {baseline} have no measurement in common for suites {', '.join(suites)} "
            f"({candidate}: {', '.join(have[candidate]) or 'none'}; {baseline}: {', '.join(have[baseline]) or 'none'})"
            f". Run `zephyr eval run --model NAME --suite {suites[0]}` for both models"
        )
    rows = [_gate_row(row, max_drop, min_items, margin, gating=_gates(row.benchmark, row.metric, served))
            for row in compared]
    if not any(row.gating for row in rows):
        raise GateError(
            f"of what {candidate} and {baseline} have in common ({', '.join(row.key for row in rows)}), nothing is a "
            f"gating measurement (of the text suite, only {', '.join(TEXT_GATING_METRICS)} gate); run `zephyr eval run "
            f"--model NAME --suite {suites[0]}` for both models")
    gated_benchmarks = {row.benchmark for row in rows if row.gating}
    base_served = {m.benchmark for m in base_run.measurements if m.metric in SERVED_METRICS}
    compared_keys = {row.key for row in compared}
    # An MCQ benchmark is gated as a whole where both have its served method (it stands for the other formats);
    # otherwise each gating format must be compared itself, as must each of the text suite's gating shares (a
    # candidate's text run from before names_key existed).
    missing = sorted(m.key for m in base_run.measurements
                     if suite_of(m.benchmark) in suites and _gates(m.benchmark, m.metric, base_served)
                     and (m.benchmark not in gated_benchmarks
                          # Not compared: a text share, a GSM8K mode every run scores (one only an older run
                          # scored is shown), or an MCQ format where the served method is not on both sides (the
                          # baseline's served method the candidate lacks included: no other format stands in for
                          # it, and a letter collapse would pass on the candidate's cloze alone).
                          or (m.key not in compared_keys
                              and (suite_of(m.benchmark) == "text"
                                   or (m.benchmark == "gsm8k" and m.metric in GSM8K_METRICS)
                                   or (suite_of(m.benchmark) == "mcq" and m.benchmark not in served)))))
    keys = {name: {m.key for m in run.measurements if suite_of(m.benchmark) in suites} for name, run in runs.items()}
    skipped = keys[candidate] ^ keys[baseline]
    # What else both have went uncompared for a reason compare_runs saw: the rest refused the gate above.
    info_why = {part: why for key, why in info_problems.items() for part in key.split(", ")}
    not_comparable = {key: info_why.get(key) or unlike_prompts.get(
                          key, "scored by different judges (reward model, BERTScore backbone or layers, DialogRPT "
                          "weights)")
                      for key in sorted((keys[candidate] & keys[baseline]) - compared_keys)}
    # Only rows the verdict rests on: an info row (the reward model's score) may need options a plain rerun lacks.
    gating_keys = {row.key for row in rows if row.gating}
    unreproducible = {name: keys for name in (candidate, baseline)
                      if (keys := unreproducible_rows(history[name], gating_keys))}
    unmeasured = [suite for suite in suites if not any(suite_of(b) == suite for b in gated_benchmarks)]
    unlike = unlike_dtypes(history[candidate], history[baseline], gating_keys)
    return GateResult(
        candidate=candidate,
        baseline=baseline,
        max_drop=max_drop,
        suites=suites,
        unmeasured=unmeasured,
        suites_asked=asked,
        rows=rows,
        skipped=sorted(skipped),
        not_comparable=not_comparable,
        reviews=reviews,
        unreproducible=unreproducible,
        missing=missing,
        allow_missing=allow_missing,
        min_items=min_items,
        margin=margin,
        unlike_dtypes=unlike,
    )


def unlike_dtypes(candidate_runs: list[EvalRun], baseline_runs: list[EvalRun], keys: set[str]) -> list[str]:
    """"key (candidate's dtype vs baseline's)" for each of `keys` whose measurements, as the merged views choose
    them (chosen_sources), were computed in other dtypes; runs that recorded none are taken on trust."""
    ours, theirs = chosen_sources(candidate_runs), chosen_sources(baseline_runs)
    found = []
    for key in sorted(keys & ours.keys() & theirs.keys()):
        a, b = (sources[key][1].engine.get("dtype") for sources in (ours, theirs))
        if a and b and a != b:
            found.append(f"{key} ({a} vs {b})")
    return found


# The suites whose figures are read from generated answers.
GENERATION_SUITES = ("gsm8k", "text")


def unreproducible_rows(runs: list[EvalRun], keys: set[str]) -> list[str]:
    """Of `keys`, the generation rows whose figures (chosen from a model's `runs` as the gate chooses) come from a
    run made before offline engines kept vLLM's core in process (offline/engine.py, 2026-12-03): their answers were
    one draw of many, and a rerun would differ."""
    return sorted(key for key, (m, run) in chosen_sources(runs).items()
                  if key in keys and suite_of(m.benchmark) in GENERATION_SUITES
                  and run.engine.get("engine_core") != IN_PROCESS)
