"""The report's sections, each built from the models' views: what to say, in document blocks (evals.report.document),
in the order `build_sections` puts them."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from evals.gate import compare_runs, different_data, fmt_delta, fmt_value, order_key
from evals.preference import rm_win_rate, scored_in_common
from evals.results import SUITE_BENCHMARKS, Measurement, SpeedRecord, is_share, metric_label, same_judge
from zephyr.registry import QUANT_METHODS, Registry

from .document import MISSING, Block, DocTable, Section
from .plots import NO_MATPLOTLIB, plot_accuracy, plot_quantized, plot_reliability, plot_rm
from .views import (
    SERVED_METRIC,
    ModelView,
    concurrencies,
    fmt_number,
    fmt_score,
    fmt_size,
    quant_summary,
)

MCQ_BENCHMARKS = SUITE_BENCHMARKS["mcq"]
# The metric whose MMLU subject breakdown is shown, best first: /mcq's default method, then the other formats.
GROUP_METRICS = (SERVED_METRIC, "letter_acc", "letter_acc_server", "cloze_acc", "cloze_acc_norm")


# --- sections ------------------------------------------------------------------------------------------------


def _command(model: str, suite: str) -> str:
    return f"`zephyr eval run --model {model} --suite {suite}`"


def limits_cell(limits: dict[str, set[int | None]]) -> str:
    """"whole splits", or each suite's limit (several where its measurements come from runs of different sizes)."""
    if all(found == {None} for found in limits.values()):
        return "whole splits"
    return "; ".join(f"{suite}: " + ", ".join("whole" if n is None else f"first {n}"
                                               for n in sorted(found, key=lambda n: n or 0))
                     for suite, found in sorted(limits.items()))


def _header(views: list[ModelView]) -> Section:
    rows = []
    for v in views:
        measured = v.run.created_at.strftime("%Y-%m-%d %H:%M UTC") if v.run else "no results"
        limit = limits_cell(v.limits) if v.run else MISSING
        rows.append(
            [
                v.name,
                v.parent or MISSING,
                v.method or MISSING,
                fmt_size(v.size_bytes),
                quant_summary(v.quantization),
                measured,
                limit,
            ]
        )
    return Section(
        "Models",
        [
            f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. Accuracies are in % with a 95% bootstrap "
            "confidence interval in brackets (10,000 resamples, percentile method); text metrics and reward-model "
            "scores are in their own units.",
            DocTable(["model", "parent", "method", "size on disk", "quantization", "latest run",
                      "questions per benchmark"], rows),
        ],
    )


def _missing(views: list[ModelView]) -> Section | None:
    lines = []
    # In SUITE_BENCHMARKS order: mcq first, the suite every comparison starts with.
    measured_suites = [
        s for s in SUITE_BENCHMARKS if any(m.suite == s for v in views if v.run for m in v.run.measurements)
    ]
    for v in views:
        if v.run is None:
            suites = measured_suites or ["mcq"]
            lines.append(f"{v.name}: no results. Run " + ", ".join(_command(v.name, s) for s in suites) + ".")
            continue
        have = {m.suite for m in v.run.measurements}
        # Only suites another model has: those are the gaps in the comparison tables.
        for suite in (s for s in measured_suites if s not in have):
            lines.append(f"{v.name}: no {suite} results. Run {_command(v.name, suite)}.")
    return Section("Missing results", lines) if lines else None


def _benchmarks(views: list[ModelView]) -> list[Section]:
    measured = [v for v in views if v.run]
    benchmarks = sorted({m.benchmark for v in measured for m in v.run.measurements}, key=order_key)
    sections = []
    for bench in benchmarks:
        metrics = sorted(
            {m.metric for v in measured for m in v.run.measurements if m.benchmark == bench},
            key=lambda metric: (not is_share(metric), metric),
        )
        rows, splits = [], set()
        for v in measured:
            ms = [v.get(f"{bench}/{metric}") for metric in metrics]
            if not any(ms):
                continue
            ns = sorted({m.n for m in ms if m})
            splits |= {m.split for m in ms if m}
            rows.append([v.name, "/".join(map(str, ns))] + [fmt_score(m, v.ci(m)) if m else MISSING for m in ms])
        units = "accuracy in %" if all(is_share(m) for m in metrics) else "accuracies in %, other metrics raw"
        sections.append(
            Section(
                bench,
                [
                    DocTable(
                        ["model", "n", *map(metric_label, metrics)], rows,
                        caption=f"split {', '.join(sorted(splits))}; {units}; 95% CI"
                    )
                ],
                level=3,
            )
        )
    return sections


def _vs_parent(views: list[ModelView]) -> Section | None:
    by_name = {v.name: v for v in views}
    blocks: list[Block] = []
    for v in views:
        parent = by_name.get(v.parent or "")
        if parent is None or v.run is None or parent.run is None:
            continue
        rows, problems = compare_runs(v.run, parent.run)
        table_rows = [
            [
                r.benchmark,
                metric_label(r.metric),
                str(r.n),
                fmt_value(r.baseline, r.share),
                fmt_value(r.candidate, r.share),
                fmt_delta(r.delta, r.low, r.high, r.share),
            ]
            for r in rows
        ]
        blocks.append(f"**{v.name}** ({v.method or 'unknown method'}) vs its parent **{parent.name}**:")
        if table_rows:
            blocks.append(
                DocTable(
                    ["benchmark", "metric", "n common", parent.name, v.name, "delta"],
                    table_rows,
                    caption="delta = model - parent over the items both were measured on; points for accuracies; "
                    "95% paired bootstrap CI",
                )
            )
        else:
            blocks.append("No measurement in common.")
        for key, why in problems.items():
            blocks.append(f"{key} not compared: {why}.")
    if not blocks:
        return None
    return Section("Versus parent", blocks)


def _quantized(views: list[ModelView], registry: Registry | None, plots: Path) -> Section | None:
    by_name = {v.name: v for v in views}
    quantized = [v for v in views if v.method in QUANT_METHODS]
    if not quantized:
        return None

    def parent_size(name: str | None) -> int | None:
        if name in by_name:
            return by_name[name].size_bytes
        if name and registry is not None and registry.exists(name):
            return registry.get(name).size_bytes()
        return None

    def linear_ratio(v: ModelView) -> str:
        if v.method not in QUANT_METHODS:
            return "1.00x"
        stats = registry.get(v.name).manifest.stats if registry is not None and registry.exists(v.name) else {}
        return f"{stats['linear_ratio']:.2f}x" if stats.get("linear_ratio") else MISSING

    # Each parent (when it is in the report) first, then its quantized children.
    ordered: list[tuple[ModelView, int | None]] = []
    for parent in dict.fromkeys(v.parent for v in quantized):
        if parent in by_name:
            ordered.append((by_name[parent], by_name[parent].size_bytes))
        ordered += [(v, parent_size(parent)) for v in quantized if v.parent == parent]
    acc_keys = [
        f"{b}/{m}"
        for b in MCQ_BENCHMARKS
        for m in (SERVED_METRIC, "letter_acc", "cloze_acc")
        if any(v.get(f"{b}/{m}") for v in quantized)  # what the variants were measured on, not all the parent has
    ]
    letter_keys = [k for k in acc_keys if k.endswith("/letter_acc")]
    rows = []
    for v, base_size in ordered:
        ratio = f"{v.size_bytes / base_size:.2f}x" if v.size_bytes and base_size else MISSING
        accs = [fmt_value(m.score * 100, True) if (m := v.get(k)) else MISSING for k in acc_keys]
        same = [_same_letter(v, by_name.get(v.parent or ""), k) for k in letter_keys]
        rss = v.run.speed.rss_peak_bytes if v.run else None
        rows.append([v.name, v.method or MISSING, quant_summary(v.quantization), fmt_size(v.size_bytes), ratio,
                     linear_ratio(v), fmt_size(rss) if rss else MISSING, *accs, *same])
    blocks: list[Any] = [DocTable(
        ["model", "method", "quantization", "size on disk", "size vs parent", "linear weights vs parent",
         "RSS served (peak)", *acc_keys, *(f"{k.split('/')[0]} same letter as parent" for k in letter_keys)], rows,
        caption="accuracies in %, each over the items that model was measured on (n in the benchmark tables; the "
        "paired differences over common items, with CIs, are under \"Versus parent\"); linear weights: "
        "the decoder's Linear layers, what 4-bit quantizes (the tied embedding is counted in the checkpoint); same "
        "letter: the share of common questions where the variant's /mcq answer equals its parent's (fidelity, which "
        "accuracy alone hides when both are near chance)")]
    if speed := _speed_table(ordered):
        blocks.append(speed)
    try:
        if figure := plot_quantized(ordered, acc_keys, plots):
            blocks.append(figure)
    except ImportError:
        blocks.append(NO_MATPLOTLIB)
    return Section("Quantized versus unquantized", blocks)


def _same_letter(v: ModelView, parent: ModelView | None, key: str) -> str:
    mine, theirs = v.get(key), parent.get(key) if parent else None
    if mine is None or theirs is None or v.method not in QUANT_METHODS:
        return MISSING
    a, b = mine.details.get("answers", {}), theirs.details.get("answers", {})
    common = a.keys() & b.keys()
    if not common or different_data(mine, theirs, {}, {}):  # ids are positional in SciQ: other data, other items
        return MISSING
    return f"{fmt_value(100 * sum(a[i] == b[i] for i in common) / len(common), True)} (n={len(common)})"


def _speed_table(ordered: list[tuple[ModelView, int | None]]) -> DocTable | None:
    """Served throughput and latency per concurrency (from `loadtest.variants`), each against the parent."""
    levels = concurrencies(ordered)
    if not levels:
        return None
    by_name = {v.name: v for v, _ in ordered}
    header = ["model"]
    for c in levels:
        header += [f"tok/s @{c}", f"vs parent @{c}", f"p50 latency @{c} (s)"]
    header.append(f"p50 TTFT @{levels[0]} (ms)")  # the lowest concurrency measured: 1 where any model has it
    rows = []
    for v, _ in ordered:
        speed = v.run.speed if v.run else SpeedRecord()
        tok = speed.tok_per_s
        parent = by_name.get(v.parent) if v.parent else None
        parent_speed = parent.run.speed if parent and parent.run else SpeedRecord()
        parent_tok = parent_speed.tok_per_s if speed.same_session(parent_speed) else {}
        row = [v.name]
        for c in levels:
            ratio = f"{tok[c] / parent_tok[c]:.2f}x" if c in tok and parent_tok.get(c) else MISSING
            latency = speed.latency_p50_s.get(c)
            row += [fmt_number(tok[c]) if c in tok else MISSING, ratio if v.parent else "1.00x" if c in tok
                    else MISSING, fmt_number(latency) if latency is not None else MISSING]
        ttft = speed.ttft_p50_ms.get(levels[0])
        row.append(fmt_number(ttft) if ttft is not None else MISSING)
        rows.append(row)
    return DocTable(header, rows, caption="streaming chats of 64 tokens served by `zephyr serve` on the machine that "
                    "ran `loadtest.variants` (median of rounds); @N: N concurrent requests; vs parent: only against "
                    "the parent measured in the same `loadtest.variants` session (— otherwise: one model's speed "
                    "moves by up to a quarter between sessions on one machine, as much as some variants differ)")


def _calibration(views: list[ModelView], plots: Path) -> Section | None:
    """How honest the served method's confidence is: ECE, Brier, accuracy at coverage and reliability diagrams."""
    rows, curves, stale = [], [], []
    for v in views:
        for bench in MCQ_BENCHMARKS:
            m = v.get(f"{bench}/{SERVED_METRIC}")
            figures = m.details.get("calibration") if m else None
            if not figures:
                continue
            coverage = figures["coverage_accuracy"]
            method = m.details.get("method", MISSING) + (" (stale)" if m.key in v.stale else "")
            if m.key in v.stale and v.name not in stale:
                stale.append(v.name)
            rows.append([v.name, bench, m.split, str(m.n), method,
                         "yes" if m.details.get("calibrated") else "no", fmt_value(m.score * 100, True),
                         f"{figures['ece']:.3f}", f"{figures['brier']:.3f}",
                         *(fmt_value(coverage[k] * 100, True) for k in ("100%", "80%", "50%"))])
            curves.append((v.name, bench, figures["reliability"]))
    if not rows:
        return None
    blocks: list[Block] = [
        "The served method (`auto`) for each model: what `zephyr eval calibrate` chose and calibrated on validation "
        "splits, or cloze without a record. Accuracy at 80% / 50% coverage answers only the most confident share of "
        "questions, what a tutor that may say \"I am not sure\" (`min_confidence`) delivers.",
        DocTable(["model", "benchmark", "split", "n", "method", "calibrated", "accuracy", "ECE (15 bins)", "Brier",
                  "acc @100%", "acc @80%", "acc @50%"], rows,
                 caption="accuracy in %; ECE and Brier: lower is better")]
    if stale:
        blocks.insert(1, "**Stale:** the rows marked (stale) were measured under another /mcq calibration record "
                      "than the model's entry holds now, so the service no longer answers as they show; "
                      + "; ".join(_command(name, "mcq") for name in stale) + " measures anew.")
    try:
        blocks.append(plot_reliability(curves, plots))
    except ImportError:
        blocks.append(NO_MATPLOTLIB)
    return Section("Confidence and calibration", blocks)


def _mmlu_subjects(views: list[ModelView]) -> Section | None:
    with_groups = {
        metric: [v for v in views if (m := v.get(f"mmlu/{metric}")) and m.groups] for metric in GROUP_METRICS
    }
    metric = next((metric for metric in GROUP_METRICS if with_groups[metric]), None)
    if metric is None:
        return None
    shown = with_groups[metric]
    groups = {v.name: v.get(f"mmlu/{metric}").groups for v in shown}  # type: ignore[union-attr]
    subjects = sorted({s for g in groups.values() for s in g}, key=lambda s: (s != "stem", s))
    rows = [
        [s] + [fmt_value(groups[v.name][s] * 100, True) if s in groups[v.name] else MISSING for v in shown]
        for s in subjects
    ]
    return Section(
        "MMLU per subject",
        [DocTable(["subject", *(v.name for v in shown)], rows, caption=f"{metric} in %; stem is the STEM aggregate")],
    )


def _rm(views: list[ModelView], plots: Path) -> Section | None:
    # A run saved before non-number scores were left out at scoring may hold one: the rest are shown.
    scored = [(v, m, x[np.isfinite(x)]) for v in views if (m := v.get("rm/rm_score"))
              and (x := np.array(list(m.items.values()), dtype=float)).size and np.isfinite(x).any()]
    if not scored:
        return None
    rows = []
    for v, m, x in scored:
        std = fmt_value(float(x.std(ddof=1)), False) if x.size > 1 else MISSING
        rows.append(
            [
                v.name,
                str(x.size),
                fmt_score(m, v.ci(m)),
                fmt_value(float(np.median(x)), False),
                std,
                fmt_value(float(x.min()), False),
                fmt_value(float(x.max()), False),
            ]
        )
    blocks: list[Block] = [
        DocTable(
            ["model", "n", "mean [95% CI]", "median", "std", "min", "max"],
            rows,
            caption="reward-model score per question (higher is preferred)",
        )
    ]
    try:
        blocks.append(plot_rm([(v.name, x) for v, _, x in scored], plots))
    except ImportError:
        blocks.append(NO_MATPLOTLIB)
    return Section("Reward-model scores", blocks)


def _rm_comparable(a: Measurement, b: Measurement) -> bool:
    """Whether two models' reward-model scores can be compared: numbers on common questions of the same data, by
    the same reward model."""
    return bool(scored_in_common(a.items, b.items)) and same_judge(a, b) and not different_data(a, b, {}, {})


def _rm_win_rates(views: list[ModelView]) -> Section | None:
    scored = sorted(((v.name, m) for v in views if (m := v.get("rm/rm_score")) and m.items), key=lambda s: s[0])
    rows = []
    for (a, a_m), (b, b_m) in combinations(scored, 2):
        if not _rm_comparable(a_m, b_m):
            continue
        r = rm_win_rate(a_m.items, b_m.items)
        rows.append([a, b, str(r["n"]), str(r["wins"]), str(r["losses"]), str(r["ties"]),
                     _fmt_rate(r["n"], r["win_rate"], r["ci95"])])
    if not rows:
        return None
    return Section(
        "Reward-model win rates",
        [
            DocTable(
                ["model A", "model B", "n common", "A wins", "B wins", "ties", "A win rate [95% CI]"],
                rows,
                caption="per question both were scored on, the answer with the higher reward-model score wins; "
                "win rate in %, ties count half, with a Wilson interval",
            )
        ],
    )


def _reward_models(registry: Registry | None) -> Section | None:
    """Every registered reward model's agreement with its held-out human preferences (`zephyr train rm`)."""
    measured = [(e.name, e.manifest.evals) for e in (registry.list() if registry else [])
                if e.manifest.method == "rm" and "heldout_agreement" in e.manifest.evals]
    if not measured:
        return None
    rows = [_reward_model_row(name, evals) for name, evals in measured]
    return Section("Reward models: agreement with held-out human preferences", [DocTable(
        ["reward model", "held-out pairs", "agreement % [95% CI]", "prefer the longer answer % [95% CI]",
         "agreement where people chose the shorter % (pairs)", "validation agreement % (pairs)"], rows,
        caption="share of held-out pairs whose chosen answer the reward model scores higher (a tie disagrees), Wilson "
        "intervals; the length baseline is what a reward model must beat, and where people chose the shorter reply "
        "length cannot explain an agreement (recorded since 2026-12-02). Validation pairs "
        "(`data.validation_fraction`) are carved from training and are what hyper-parameters were chosen on; the "
        "held-out figure is not")])


def _reward_model_row(name: str, evals: dict[str, Any]) -> list[str]:
    held = evals["heldout_agreement"]
    validation = evals.get("validation_agreement")
    return [name, str(held["n"]), _fmt_rate(held["n"], held["agreement"], held["ci95"]),
            _fmt_rate(held["n"], held["longer_answer"], held["longer_answer_ci95"]),
            _fmt_agreement_of(held.get("shorter_chosen")), _fmt_agreement_of(validation)]


def _fmt_agreement_of(part: dict[str, Any] | None) -> str:
    """An agreement record's rate, interval and pair count; MISSING for a part not recorded."""
    if not part:
        return MISSING
    return f"{_fmt_rate(part['n'], part['agreement'], part['ci95'])} ({part['n']})"


def _fmt_rate(n: int, rate: float | None, ci: tuple[float, float] | None) -> str:
    if rate is None or n == 0:
        return MISSING
    text = fmt_value(rate * 100, True)
    if ci is not None:
        text += f" [{fmt_value(ci[0] * 100, True)}, {fmt_value(ci[1] * 100, True)}]"
    return text


def _rm_rate_of(views: list[ModelView], a: str, b: str) -> str:
    """A's reward-model win rate over B on the questions both were scored on, for the human table's side column."""
    scores = {v.name: m for v in views if (m := v.get("rm/rm_score")) and m.items}
    if a not in scores or b not in scores or not _rm_comparable(scores[a], scores[b]):
        return MISSING
    r = rm_win_rate(scores[a].items, scores[b].items)
    return f"{_fmt_rate(r['n'], r['win_rate'], r['ci95'])} (n {r['n']})"


def _human(result: dict[str, Any], source: Path, views: list[ModelView] | None = None) -> Section:
    name = source.name.replace("`", "'")
    blocks: list[Block] = []
    if not result["pairs"]:
        blocks.append(f"`{name}` holds no preference pairs.")
        return Section("Human review win rates", blocks)
    intro = (f"From `{name}`: {result['pairs']} human preference pairs (ties and both-bad verdicts never become "
             "pairs, so every pair is a decisive win). Win rates in % with a 95% Wilson interval in brackets.")
    if result["without_models"]:
        intro += f" {result['without_models']} pairs name no models and count only for served vs candidate."
    if result.get("stale"):
        intro += (f" {result['stale']} pairs are left out: other weights of their models' names wrote them (before a "
                  "model was remade under its name).")
    blocks.append(intro)
    served = result["served_vs_candidate"]
    if served["n"]:
        rate = _fmt_rate(served["n"], served["served_win_rate"], served["ci95"])
        blocks.append(f"Served answer vs candidate: the served answer won {served['served_wins']} of {served['n']} "
                      f"pairs, the candidate {served['candidate_wins']}; served win rate {rate}.")
    else:
        blocks.append("Served answer vs candidate: no pair says which answer was served.")
    if result["models"]:
        blocks.append(
            DocTable(
                ["model", "wins", "losses", "n", "win rate [95% CI]"],
                [
                    [r["model"], str(r["wins"]), str(r["losses"]), str(r["n"]),
                     _fmt_rate(r["n"], r["win_rate"], r["ci95"])]
                    for r in result["models"]
                ],
                caption="pairs each model's answer was in; a resampled candidate of a model reads e.g. model [T=1]",
            )
        )
    if result["head_to_head"]:
        blocks.append(
            DocTable(
                ["model A", "model B", "n", "A wins", "B wins", "A win rate [95% CI]", "A RM win rate [95% CI]"],
                [
                    [h["a"], h["b"], str(h["n"]), str(h["a_wins"]), str(h["b_wins"]),
                     _fmt_rate(h["n"], h["a_win_rate"], h["ci95"]), _rm_rate_of(views or [], h["a"], h["b"])]
                    for h in result["head_to_head"]
                ],
                caption="head to head: pairs whose two answers came from these two models, as reviewers judged "
                "them and (last column) as the reward model scores the two models' answers to the text suite's "
                "questions, ties half, with its Wilson interval and question count; — where either model has no "
                "reward-model scores",
            )
        )
    return Section("Human review win rates", blocks)


# --- all of them, in order ----------------------------------------------------------------------------------


def build_sections(
    views: list[ModelView], plots: Path, registry: Registry | None = None, reviews: tuple[dict, Path] | None = None
) -> list[Section]:
    sections: list[Section] = [_header(views)]
    if missing := _missing(views):
        sections.append(missing)
    if any(v.run for v in views):
        bench = Section("Benchmarks")
        try:
            if figure := plot_accuracy(views, plots):
                bench.blocks.append(figure)
        except ImportError:
            bench.blocks.append(NO_MATPLOTLIB)
        sections += [bench, *_benchmarks(views)]
    optional = (_calibration(views, plots), _vs_parent(views), _quantized(views, registry, plots),
                _mmlu_subjects(views), _reward_models(registry), _rm(views, plots),
                _rm_win_rates(views))
    sections += [s for s in optional if s]
    if reviews is not None:
        sections.append(_human(*reviews, views))
    return sections

