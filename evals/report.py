"""The evaluation report: `report.md` and a self-contained `report.html` (inline CSS, plots as base64 PNG).

The report is first built as a small document (sections of paragraphs, tables and figures) and then rendered
twice, so the Markdown and the HTML always say the same thing and escaping happens in one place."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from evals.gate import compare_runs, fmt_delta, fmt_value, is_share, order_key, scale_of
from evals.preference import human_win_rates, rm_win_rate
from evals.results import SUITE_BENCHMARKS, EvalRun, Measurement, ResultStore
from evals.stats import bootstrap_ci
from zephyr.registry import Registry, check_name

QUANT_METHODS = ("gptq", "awq", "w8a8", "easyquant", "bnb")
MCQ_BENCHMARKS = SUITE_BENCHMARKS["mcq"]
# The metric whose MMLU subject breakdown is shown, best first (the letter format is what the service answers).
GROUP_METRICS = ("letter_acc", "letter_acc_server", "cloze_acc", "cloze_acc_norm")
PLOTS_DIR = "plots"
PLOT_FILES = ("accuracy.png", "rm_scores.png", "quantized.png", "calibration.png")
SERVED_METRIC = "mcq_acc_auto"  # /mcq's default method, through each model's own calibration record
MISSING = "—"
NO_MATPLOTLIB = "matplotlib is not installed, so this report has no plots: `pip install matplotlib`."


# --- the document --------------------------------------------------------------------------------------------


@dataclass
class DocTable:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class DocFigure:
    path: Path  # the PNG under out_dir/plots
    caption: str


Block = str | DocTable | DocFigure  # a str is a paragraph; `backticks` mark code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


# --- what is known about each model --------------------------------------------------------------------------


@dataclass
class ModelView:
    name: str
    run: EvalRun | None
    parent: str | None
    method: str | None
    size_bytes: int | None
    quantization: dict[str, Any] | None
    cis: dict[str, tuple[float, float] | None] = field(default_factory=dict)  # key -> CI of the mean

    def get(self, key: str) -> Measurement | None:
        return self.run.get(key) if self.run else None

    def ci(self, m: Measurement) -> tuple[float, float] | None:
        if m.key not in self.cis:
            try:
                self.cis[m.key] = bootstrap_ci(list(m.items.values()))
            except ValueError:  # no items, or NaN among them: show the score without an interval
                self.cis[m.key] = None
        return self.cis[m.key]


def _collect(store: ResultStore, models: list[str], registry: Registry | None) -> list[ModelView]:
    views = []
    for name in models:
        run = store.latest(name)
        entry = registry.get(name) if registry is not None and registry.exists(name) else None
        manifest = entry.manifest if entry else None
        size = run.size_bytes if run else None
        views.append(
            ModelView(
                name=name,
                run=run,
                parent=(run.parent if run else None) or (manifest.parent if manifest else None),
                method=(run.method if run else None) or (manifest.method if manifest else None),
                size_bytes=size if size is not None else (entry.size_bytes() if entry else None),
                quantization=run.quantization if run else None,
            )
        )
    return views


# --- formatting ----------------------------------------------------------------------------------------------


def fmt_size(n: int | float | None) -> str:
    if n is None:
        return MISSING
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_number(x: float) -> str:
    if not math.isfinite(x):
        return MISSING
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_score(m: Measurement, ci: tuple[float, float] | None) -> str:
    share, scale = is_share(m.metric), scale_of(m.metric)
    if not math.isfinite(m.score):
        return MISSING
    text = fmt_value(m.score * scale, share)
    if ci is not None:
        text += f" [{fmt_value(ci[0] * scale, share)}, {fmt_value(ci[1] * scale, share)}]"
    return text


def _quant_summary(q: dict[str, Any] | None) -> str:
    if not q:
        return MISSING
    parts = [str(q.get("quant_method", "quantized"))]
    for key in ("format", "bits", "w_bit", "group_size", "q_group_size"):
        if key in q and not isinstance(q[key], dict | list):
            parts.append(f"{key}={q[key]}")
    return " ".join(parts)


def _command(model: str, suite: str) -> str:
    return f"`zephyr eval run --model {model} --suite {suite}`"


# --- sections ------------------------------------------------------------------------------------------------


def _header(views: list[ModelView]) -> Section:
    rows = []
    for v in views:
        measured = v.run.created_at.strftime("%Y-%m-%d %H:%M UTC") if v.run else "no results"
        limit = str(v.run.limit) if v.run and v.run.limit else MISSING
        rows.append(
            [
                v.name,
                v.parent or MISSING,
                v.method or MISSING,
                fmt_size(v.size_bytes),
                _quant_summary(v.quantization),
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
            DocTable(["model", "parent", "method", "size on disk", "quantization", "latest run", "limit"], rows),
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
                        ["model", "n", *metrics], rows, caption=f"split {', '.join(sorted(splits))}; {units}; 95% CI"
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
                r.metric,
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
        rss = v.run.speed.get("rss_peak_bytes") if v.run else None
        rows.append([v.name, v.method or MISSING, _quant_summary(v.quantization), fmt_size(v.size_bytes), ratio,
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
        if figure := _plot_quantized(ordered, acc_keys, plots):
            blocks.append(figure)
    except ImportError:
        blocks.append(NO_MATPLOTLIB)
    return Section("Quantized versus unquantized", blocks)


def _calibration(views: list[ModelView], plots: Path) -> Section | None:
    """How honest the served method's confidence is: ECE, Brier, accuracy at coverage and reliability diagrams."""
    rows, curves = [], []
    for v in views:
        for bench in MCQ_BENCHMARKS:
            m = v.get(f"{bench}/{SERVED_METRIC}")
            figures = m.details.get("calibration") if m else None
            if not figures:
                continue
            coverage = figures["coverage_accuracy"]
            rows.append([v.name, bench, m.split, str(m.n), m.details.get("method", MISSING),
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
    try:
        blocks.append(_plot_reliability(curves, plots))
    except ImportError:
        blocks.append(NO_MATPLOTLIB)
    return Section("Confidence and calibration", blocks)


def _plot_reliability(curves: list[tuple[str, str, list[dict[str, float]]]], plots: Path) -> DocFigure:
    benches = list(dict.fromkeys(bench for _, bench, _ in curves))
    fig, axes = _figure(3.2 * len(benches) + 0.6, 3.6, ncols=len(benches))
    axes = np.atleast_1d(axes)
    for ax, bench in zip(axes, benches, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for name, b, bins in curves:
            if b == bench:
                ax.plot([x["confidence"] for x in bins], [x["accuracy"] for x in bins], marker="o", markersize=3,
                        label=name)
        ax.set_title(bench, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    return _save(fig, plots / "calibration.png", "Reliability of the served method: accuracy against confidence "
                 "(15 bins; the dotted diagonal is perfect calibration)")


def _same_letter(v: ModelView, parent: ModelView | None, key: str) -> str:
    mine, theirs = v.get(key), parent.get(key) if parent else None
    if mine is None or theirs is None or v.method not in QUANT_METHODS:
        return MISSING
    a, b = mine.details.get("answers", {}), theirs.details.get("answers", {})
    common = a.keys() & b.keys()
    if not common:
        return MISSING
    return f"{fmt_value(100 * sum(a[i] == b[i] for i in common) / len(common), True)} (n={len(common)})"


def _concurrencies(ordered: list[tuple[ModelView, int | None]]) -> list[str]:
    found = {c for v, _ in ordered if v.run for c in v.run.speed.get("tok_per_s", {})}
    return sorted(found, key=int)


def _speed_table(ordered: list[tuple[ModelView, int | None]]) -> DocTable | None:
    """Served throughput and latency per concurrency (from `loadtest.variants`), each against the parent."""
    levels = _concurrencies(ordered)
    if not levels:
        return None
    by_name = {v.name: v for v, _ in ordered}
    header = ["model"]
    for c in levels:
        header += [f"tok/s @{c}", f"vs parent @{c}", f"p50 latency @{c} (s)"]
    header.append("p50 TTFT @1 (ms)")
    rows = []
    for v, _ in ordered:
        speed = v.run.speed if v.run else {}
        tok = speed.get("tok_per_s", {})
        parent = by_name.get(v.parent) if v.parent else None
        parent_speed = parent.run.speed if parent and parent.run else {}
        parent_tok = parent_speed.get("tok_per_s", {}) if same_session(speed, parent_speed) else {}
        row = [v.name]
        for c in levels:
            ratio = f"{tok[c] / parent_tok[c]:.2f}x" if c in tok and parent_tok.get(c) else MISSING
            latency = speed.get("latency_p50_s", {}).get(c)
            row += [fmt_number(tok[c]) if c in tok else MISSING, ratio if v.parent else "1.00x" if c in tok
                    else MISSING, fmt_number(latency) if latency is not None else MISSING]
        ttft = speed.get("ttft_p50_ms", {}).get(levels[0])
        row.append(fmt_number(ttft) if ttft is not None else MISSING)
        rows.append(row)
    return DocTable(header, rows, caption="streaming chats of 64 tokens served by `zephyr serve` on the machine that "
                    "ran `loadtest.variants` (median of rounds); @N: N concurrent requests; vs parent: only against "
                    "the parent measured in the same `loadtest.variants` session (— otherwise: one model's speed "
                    "moves by up to a quarter between sessions on one machine, as much as some variants differ)")


SAME_SESSION_SECONDS = 120.0


def same_session(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two speed records come from one `loadtest.variants` session. Records from before sessions were
    named were saved together at the end of their session, seconds apart."""
    if a.get("session") and b.get("session"):
        return a["session"] == b["session"]
    try:
        gap = datetime.fromisoformat(a["measured_at"]) - datetime.fromisoformat(b["measured_at"])
    except (KeyError, TypeError, ValueError):
        return False
    return abs(gap.total_seconds()) <= SAME_SESSION_SECONDS


def _plot_quantized(ordered: list[tuple[ModelView, int | None]], acc_keys: list[str], plots: Path) -> DocFigure | None:
    levels = _concurrencies(ordered)
    # Cloze separates the variants where letter accuracy sits at chance for a small model.
    key = next((k for k in acc_keys if k.endswith("/cloze_acc")), acc_keys[0] if acc_keys else None)
    sized = [(v, m) for v, _ in ordered for m in [v.get(key) if key else None] if m and v.size_bytes]
    if not levels and not sized:
        return None
    fig, (speed_ax, acc_ax) = _figure(11.0, 4.0, ncols=2)
    # One colour per model in both panels; legends, not labels beside the points, which overlap at equal sizes.
    colour = {v.name: f"C{i % 10}" for i, (v, _) in enumerate(ordered)}
    for v, _ in ordered:
        tok = v.run.speed.get("tok_per_s", {}) if v.run else {}
        if tok:
            xs = [int(c) for c in levels if c in tok]
            speed_ax.plot(xs, [tok[str(x)] for x in xs], marker="o", label=v.name, color=colour[v.name])
    speed_ax.set_xscale("log", base=2)
    speed_ax.set_xticks([int(c) for c in levels], levels)
    speed_ax.set_xlabel("concurrent requests")
    speed_ax.set_ylabel("output tokens/s")
    speed_ax.grid(alpha=0.3)
    if levels:
        speed_ax.legend(fontsize=7)
    for v, m in sized:
        ci = v.ci(m) or (m.score, m.score)
        acc_ax.errorbar(v.size_bytes / 1e6, m.score * 100, yerr=[[(m.score - ci[0]) * 100], [(ci[1] - m.score) * 100]],
                        fmt="o", capsize=3, color=colour[v.name], label=v.name)
    if sized:
        acc_ax.legend(fontsize=7)
    acc_ax.set_xlabel("size on disk (MB)")
    acc_ax.set_ylabel(f"{key} (%)" if key else "accuracy (%)")
    acc_ax.grid(alpha=0.3)
    return _save(fig, plots / "quantized.png", "Served throughput per concurrency, and accuracy (95% CI) against size")


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
    scored = [(v, m) for v in views if (m := v.get("rm/rm_score")) and m.items]
    if not scored:
        return None
    rows = []
    for v, m in scored:
        x = np.array(list(m.items.values()), dtype=float)
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
        blocks.append(_plot_rm([(v.name, np.array(list(m.items.values()), dtype=float)) for v, m in scored], plots))
    except ImportError:
        blocks.append(NO_MATPLOTLIB)
    return Section("Reward-model scores", blocks)


def _rm_win_rates(views: list[ModelView]) -> Section | None:
    scored = sorted(((v.name, m.items) for v in views if (m := v.get("rm/rm_score")) and m.items), key=lambda s: s[0])
    rows = []
    for (a, a_items), (b, b_items) in combinations(scored, 2):
        if not set(a_items) & set(b_items):
            continue  # measured on different questions: nothing to compare
        r = rm_win_rate(a_items, b_items)
        rows.append([a, b, str(r["n"]), str(r["wins"]), str(r["losses"]), str(r["ties"]),
                     fmt_value(r["win_rate"] * 100, True)])
    if not rows:
        return None
    return Section(
        "Reward-model win rates",
        [
            DocTable(
                ["model A", "model B", "n common", "A wins", "B wins", "ties", "A win rate"],
                rows,
                caption="per question both were scored on, the answer with the higher reward-model score wins; "
                "win rate in %, ties count half",
            )
        ],
    )


def _fmt_rate(n: int, rate: float | None, ci: tuple[float, float] | None) -> str:
    if rate is None or n == 0:
        return MISSING
    text = fmt_value(rate * 100, True)
    if ci is not None:
        text += f" [{fmt_value(ci[0] * 100, True)}, {fmt_value(ci[1] * 100, True)}]"
    return text


def _read_reviews(reviews: Path) -> dict[str, Any]:
    if not reviews.is_file():
        raise ValueError(f"reviews file {reviews} does not exist: write one with "
                         f"`zephyr review export --format dpo`")
    try:
        return human_win_rates(reviews)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise ValueError(f"{reviews} is not a `zephyr review export --format dpo` file (JSON Lines): {exc}") from None


def _human(result: dict[str, Any], source: Path) -> Section:
    name = source.name.replace("`", "'")
    blocks: list[Block] = []
    if not result["pairs"]:
        blocks.append(f"`{name}` holds no preference pairs.")
        return Section("Human review win rates", blocks)
    intro = (f"From `{name}`: {result['pairs']} human preference pairs (ties and both-bad verdicts never become "
             "pairs, so every pair is a decisive win). Win rates in % with a 95% Wilson interval in brackets.")
    if result["without_models"]:
        intro += f" {result['without_models']} pairs name no models and count only for served vs candidate."
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
                ["model A", "model B", "n", "A wins", "B wins", "A win rate [95% CI]"],
                [
                    [h["a"], h["b"], str(h["n"]), str(h["a_wins"]), str(h["b_wins"]),
                     _fmt_rate(h["n"], h["a_win_rate"], h["ci95"])]
                    for h in result["head_to_head"]
                ],
                caption="head to head: pairs whose two answers came from these two models",
            )
        )
    return Section("Human review win rates", blocks)


# --- plots ---------------------------------------------------------------------------------------------------


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _plot_accuracy(views: list[ModelView], plots: Path) -> DocFigure | None:
    measured = [v for v in views if v.run]
    keys = sorted(
        {(m.benchmark, m.metric) for v in measured for m in v.run.measurements if is_share(m.metric)},
        key=lambda k: order_key(*k),
    )
    if not keys:
        return None
    fig, ax = _figure(min(24.0, 3.0 + len(keys) * (0.35 + 0.18 * len(measured))), 4.5)
    width = 0.8 / len(measured)
    for i, v in enumerate(measured):
        xs, heights, errs = [], [], [[], []]
        for j, (bench, metric) in enumerate(keys):
            m = v.get(f"{bench}/{metric}")
            if m is None or not math.isfinite(m.score):
                continue
            ci = v.ci(m) or (m.score, m.score)
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(m.score * 100)
            errs[0].append(max(0.0, (m.score - ci[0]) * 100))
            errs[1].append(max(0.0, (ci[1] - m.score) * 100))
        ax.bar(xs, heights, width, yerr=errs, capsize=2, label=v.name)
    ax.set_xticks(range(len(keys)), [f"{b}\n{m}" for b, m in keys], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plots / "accuracy.png", "Accuracy per benchmark and metric, with 95% bootstrap CI")


def _plot_rm(data: list[tuple[str, np.ndarray]], plots: Path) -> DocFigure:
    fig, (hist, box) = _figure(11.0, 4.0, ncols=2)
    bins = np.histogram_bin_edges(np.concatenate([x for _, x in data]), bins=30)
    for name, x in data:
        hist.hist(x, bins=bins, histtype="step", linewidth=1.5, label=name)
    hist.set_xlabel("reward-model score")
    hist.set_ylabel("questions")
    hist.legend(fontsize=8)
    box.boxplot([x for _, x in data])
    box.set_xticks(range(1, len(data) + 1), [name for name, _ in data], rotation=30, ha="right", fontsize=8)
    box.set_ylabel("reward-model score")
    return _save(fig, plots / "rm_scores.png", "Reward-model score distribution per model")


def _save(fig: Any, path: Path, caption: str) -> DocFigure:
    fig.savefig(path, format="png", dpi=110)
    return DocFigure(path, caption)


# --- rendering -----------------------------------------------------------------------------------------------


def _numeric_columns(table: DocTable) -> list[bool]:
    """Columns whose filled cells all start like a number: right-aligned, so digits line up."""

    def numeric(cell: str) -> bool:
        return cell == MISSING or cell[:1].isdigit() or (cell[:1] in "+-" and cell[1:2].isdigit())

    return [i > 0 and all(numeric(row[i]) for row in table.rows) for i in range(len(table.columns))]


def _md_text(text: str) -> str:
    # Data-borne text (subject names, quantization configs) must not become Markdown/HTML markup.
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _md_paragraph(text: str) -> str:
    parts = text.split("`")
    return "`".join(p if i % 2 else _md_text(p) for i, p in enumerate(parts))


def render_markdown(title: str, sections: list[Section], out_dir: Path) -> str:
    lines = [f"# {_md_text(title)}", ""]
    for section in sections:
        lines += [f"{'#' * section.level} {_md_text(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, DocTable):
                lines.append("| " + " | ".join(_md_text(c) for c in block.columns) + " |")
                lines.append("|" + "|".join("---:" if num else "---" for num in _numeric_columns(block)) + "|")
                lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in block.rows]
                if block.caption:
                    lines += ["", f"*{_md_text(block.caption)}*"]
            elif isinstance(block, DocFigure):
                lines.append(f"![{_md_text(block.caption)}]({block.path.relative_to(out_dir).as_posix()})")
            else:
                lines.append(_md_paragraph(block))
            lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;white-space:nowrap}
th{background:#f0f0f0;text-align:left}.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}caption{caption-side:bottom;font-size:.85em;color:#555;text-align:left}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}
"""


def _html_paragraph(text: str) -> str:
    parts = text.split("`")
    out = "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))
    # **bold** is the only other markup the sections use.
    bold = out.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(bold))


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h{section.level}>{html.escape(section.title)}</h{section.level}>")
        for block in section.blocks:
            if isinstance(block, DocTable):
                caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
                align = [' class="num"' if num else "" for num in _numeric_columns(block)]
                head = "".join(f"<th{a}>{html.escape(c)}</th>" for a, c in zip(align, block.columns, strict=True))
                rows = "".join(
                    "<tr>" + "".join(f"<td{a}>{html.escape(c)}</td>" for a, c in zip(align, row, strict=True)) + "</tr>"
                    for row in block.rows
                )
                body.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(block, DocFigure):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                alt = html.escape(block.caption)
                body.append(
                    f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{alt}</figcaption></figure>"
                )
            else:
                body.append(f"<p>{_html_paragraph(block)}</p>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# --- entry point ---------------------------------------------------------------------------------------------


def build_sections(
    views: list[ModelView], plots: Path, registry: Registry | None = None, reviews: tuple[dict, Path] | None = None
) -> list[Section]:
    sections: list[Section] = [_header(views)]
    if missing := _missing(views):
        sections.append(missing)
    if any(v.run for v in views):
        bench = Section("Benchmarks")
        try:
            if figure := _plot_accuracy(views, plots):
                bench.blocks.append(figure)
        except ImportError:
            bench.blocks.append(NO_MATPLOTLIB)
        sections += [bench, *_benchmarks(views)]
    optional = (_calibration(views, plots), _vs_parent(views), _quantized(views, registry, plots),
                _mmlu_subjects(views), _rm(views, plots),
                _rm_win_rates(views))
    sections += [s for s in optional if s]
    if reviews is not None:
        sections.append(_human(*reviews))
    return sections


def write_report(
    store: ResultStore,
    models: list[str],
    out_dir: Path,
    registry: Registry | None = None,
    reviews: Path | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/report.md, out_dir/report.html and out_dir/plots/*.png; returns (markdown, html) paths.

    `reviews`, a `zephyr review export --format dpo` file, adds human win rates; ValueError when it is missing."""
    models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not models:
        raise ValueError("give at least one model to report on")
    for name in models:  # names become result paths; a bad one fails before anything is written
        check_name(name)
    # Read before anything is written: a bad file leaves an earlier report as it was.
    human = (_read_reviews(Path(reviews)), Path(reviews)) if reviews is not None else None
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:  # a plot left from an earlier report must not pass for this one's
        (plots / name).unlink(missing_ok=True)
    views = _collect(store, models, registry)
    sections = build_sections(views, plots, registry, human)
    title = f"Zephyr evaluation report: {', '.join(models)}"
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(render_markdown(title, sections, out_dir))
    html_path.write_text(render_html(title, sections))
    return md_path, html_path
