"""How much does knowing which set a question comes from make `/mcq`'s confidence honest? Validation splits only.

Reads a scores file of `zephyr eval calibrate` that carries question domains (every calibration since 2026-12-05
saves them) and refits the served candidate (`cloze_pmi` unless --candidate) by the record's own 5-fold
cross-validation, three ways: the sharpness reading the question's scores alone (the records before), reading the
question-domain head's probabilities too (the records since), and, as a ceiling no service can reach, reading the
set each question truly comes from (near one-hot domain probabilities; SciQ, which the head has no class for, gets
a flat one). Prints, per set, accuracy, mean confidence and ECE of the held-out folds; then the same with each
set left out of the fit altogether (`evals.calibration.left_out_sets`: what to expect on a set no fit has seen).

    python -m tools.question_domain_probe --scores ~/.cache/zephyr/eval-results/MODEL/calibration/scores-....json

Findings: docs/evaluation.md, "Which set a question reads like".
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.table import Table

from evals import calibration
from evals.calibrate import load_scores, without_question_domains
from zephyr import mcq
from zephyr.console import make_console

FOLDS = 5


def truly(items: dict[str, list[calibration.Scored]]) -> dict[str, list[calibration.Scored]]:
    """The same questions with the set they come from as their domain."""
    def domain(name: str) -> list[float]:
        if name not in mcq.QUESTION_DOMAINS:
            return [0.25] * len(mcq.QUESTION_DOMAINS)
        return [0.97 if d == name else 0.01 for d in mcq.QUESTION_DOMAINS]

    return {name: [dataclasses.replace(s, scores=dataclasses.replace(s.scores, domain=domain(name))) for s in scored]
            for name, scored in items.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", type=Path, required=True, help="a scores file of `zephyr eval calibrate`")
    parser.add_argument("--candidate", default="cloze_pmi", choices=sorted(calibration.CANDIDATES))
    args = parser.parse_args()
    console = make_console()
    saved = load_scores(args.scores)
    if saved.question_domain is None:
        parser.error(f"{args.scores} carries no question domains: refit it once with `zephyr eval calibrate "
                     "--scores` (which saves the scores again with them) and pass that file")
    servable = {"scores only (before)": without_question_domains(saved).scored,
                "+ question domain (served)": saved.scored}
    variants = {**servable, "+ the true set (ceiling)": truly(saved.scored)}
    table = Table(title=f"{args.candidate}, held-out folds: accuracy / mean confidence / ECE")
    table.add_column("sharpness reads")
    for name in [*saved.scored, "pooled"]:
        table.add_column(name, justify="right")
    table.add_column("pooled NLL", justify="right")
    for label, scored in variants.items():
        pooled = [s for items in scored.values() for s in items]
        given = calibration.held_out(pooled, args.candidate, FOLDS)  # the record's folds (seed 0)
        parts, start = [], 0
        for items in scored.values():
            parts.append((items, given[start:start + len(items)]))
            start += len(items)
        cells = []
        for items, part in [*parts, (pooled, given)]:
            probabilities = [p for p, _ in part]
            figures = calibration.summarize(probabilities, [s.gold for s in items], [a for _, a in part])
            confidence = sum(max(p) for p in probabilities) / len(probabilities)
            cells.append(f"{figures['accuracy']:.1%} / {confidence:.2f} / {figures['ece']:.3f}")
        table.add_row(label, *cells, f"{figures['nll']:.4f}")
    console.print(table)
    console.print(left_out_table(args.candidate, servable))
    console.print(separation(saved.scored))


def left_out_table(candidate: str, variants: dict[str, dict[str, list[calibration.Scored]]]) -> Table:
    """Each set measured by a fit on the other sets alone (the record's `left_out_set`), per variant (not the
    ceiling, which reads the set itself)."""
    table = Table(title=f"{candidate}, each set left out of the fit: accuracy / mean confidence / ECE")
    table.add_column("sharpness reads")
    names = list(next(iter(variants.values())))
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("mean NLL", justify="right")
    for label, scored in variants.items():
        figures = calibration.left_out_sets(scored, candidate)
        table.add_row(label, *[f"{figures[n]['accuracy']:.1%} / {figures[n]['confidence']:.2f} / "
                               f"{figures[n]['ece']:.3f}" for n in names],
                      f"{sum(f['nll'] for f in figures.values()) / len(figures):.4f}")
    return table


def separation(scored: dict[str, list[calibration.Scored]]) -> str:
    """How well the head tells the sets apart on these questions: the share put in their own set, and the ROC AUC
    of its ARC-Easy probability against the other sets and against ARC-Challenge alone."""
    from sklearn.metrics import roc_auc_score

    own = [(name, s.scores.domain) for name, items in scored.items() if name in mcq.QUESTION_DOMAINS for s in items]
    right = sum(mcq.QUESTION_DOMAINS[max(range(len(d)), key=d.__getitem__)] == name for name, d in own) / len(own)
    easy = mcq.QUESTION_DOMAINS.index("arc_easy")

    def auc(others: set[str]) -> float:
        pairs = [(name == "arc_easy", d[easy]) for name, d in own if name == "arc_easy" or name in others]
        return float(roc_auc_score([y for y, _ in pairs], [x for _, x in pairs]))

    rest = set(mcq.QUESTION_DOMAINS) - {"arc_easy"}
    return (f"question domain: {right:.1%} of {len(own):,} questions put in their own set; ROC AUC of P(arc_easy), "
            f"ARC-Easy against the other three sets {auc(rest):.3f}, against ARC-Challenge alone "
            f"{auc({'arc_challenge'}):.3f}")


if __name__ == "__main__":
    main()
