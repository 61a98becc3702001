"""Review statistics: win rate per model by majority vote, agreement between reviewers (raw pairwise,
Cohen's kappa per reviewer pair, Fleiss' kappa), strengths, flags, and work per reviewer.

Every verdict is first put in terms that do not depend on the random left/right order: for a pair,
`served` (the answer the student got is better), `candidate`, `tie` or `both_bad`; for a single answer,
`good` or `bad`. Agreement is measured on these labels."""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import combinations, count

import numpy as np
from statsmodels.stats.inter_rater import cohens_kappa, fleiss_kappa

PAIR_LABELS = ("served", "candidate", "tie", "both_bad")
SINGLE_LABELS = ("good", "bad")
LABELS = PAIR_LABELS + SINGLE_LABELS
FLAGS = ("incorrect", "unsafe", "gives_answer", "off_topic")
STRENGTHS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Judgement:
    """One reviewer's verdict on one item, in order-free terms."""

    item_id: str
    reviewer: str
    kind: str  # pair, single
    label: str  # one of LABELS
    strength: int | None = None  # 1-4 for served / candidate
    flags: dict[str, list[str]] = field(default_factory=dict)  # "served" / "candidate" -> flags on that answer
    served_model: str = ""
    candidate_id: str | None = None  # the generation shown beside the served answer
    candidate_model: str | None = None
    chose_left: bool | None = None  # for served / candidate: was the preferred answer shown as A?
    # A pair whose two answers are one text (a greedy candidate, a short answer): its verdict says nothing about
    # either model, so win rates leave it out, as the export does (`left_out["identical"]`).
    same_text: bool = False


def reviewer_label(digest: str | None, names: Mapping[str, str] | None = None) -> str:
    """How reviewers are named on the page and in statistics: the name given to their key (KeyRing.names), else a
    short prefix of their key's digest; never the key."""
    if not digest:
        return "open"
    return (names or {}).get(digest) or digest[:8]


def majority(labels: list[str]) -> tuple[str | None, float]:
    """The label most reviewers gave, if exactly one label has the most votes (a plurality; with two
    reviewers that means both agree), and the share of reviewers who gave it."""
    if not labels:
        return None, 0.0
    ranked = Counter(labels).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None, ranked[0][1] / len(labels)
    return ranked[0][0], ranked[0][1] / len(labels)


def by_item(judgements: list[Judgement]) -> dict[str, list[Judgement]]:
    items: dict[str, list[Judgement]] = defaultdict(list)
    for j in judgements:
        items[j.item_id].append(j)
    return dict(items)


def win_rates(judgements: list[Judgement], overlap: int = 1) -> list[dict]:
    """Per model, over pair items with a majority: wins, losses, ties, both-bad, and win rate = wins / items. Only
    items judged by all `overlap` reviewers count: one verdict of two is a majority that the second could undo. A pair
    of one text twice is no contest (Judgement.same_text)."""
    table: dict[str, Counter] = defaultdict(Counter)
    for group in by_item(judgements).values():
        first = group[0]
        if first.kind != "pair" or len(group) < overlap or first.same_text:
            continue
        label, _ = majority([j.label for j in group])
        if label is None:
            continue
        outcome = {"served": ("wins", "losses"), "candidate": ("losses", "wins"),
                   "tie": ("ties", "ties"), "both_bad": ("both_bad", "both_bad")}[label]
        for model, result in zip((first.served_model, first.candidate_model or "?"), outcome, strict=True):
            table[model][result] += 1
            table[model]["items"] += 1
    rows = []
    for model in sorted(table):
        counts = table[model]
        rows.append({"model": model, "items": counts["items"], "wins": counts["wins"], "losses": counts["losses"],
                     "ties": counts["ties"], "both_bad": counts["both_bad"],
                     "win_rate": counts["wins"] / counts["items"]})
    return rows


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _kappa(compute, table) -> float | None:
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return _finite(compute(table))


def agreement(judgements: list[Judgement]) -> dict:
    items = {item: group for item, group in by_item(judgements).items() if len(group) >= 2}
    agreeing = pairs = 0
    for group in items.values():
        for x, y in combinations(group, 2):
            pairs += 1
            agreeing += x.label == y.label

    # Cohen's kappa for each pair of reviewers over the items both judged.
    ratings: dict[str, dict[str, str]] = defaultdict(dict)
    for j in judgements:
        ratings[j.reviewer][j.item_id] = j.label
    index = {label: i for i, label in enumerate(LABELS)}
    cohen = []
    for r1, r2 in combinations(sorted(ratings), 2):
        common = sorted(set(ratings[r1]) & set(ratings[r2]))
        if len(common) < 2:
            continue
        table = np.zeros((len(LABELS), len(LABELS)))
        for item in common:
            table[index[ratings[r1][item]], index[ratings[r2][item]]] += 1
        kappa = _kappa(lambda t: cohens_kappa(t, return_results=False), table)
        cohen.append({"reviewers": [r1, r2], "items": len(common), "kappa": kappa})
    defined = [c["kappa"] for c in cohen if c["kappa"] is not None]

    # Fleiss' kappa needs the same number of ratings per item: use the items with the most common count.
    fleiss = {"items": 0, "raters": None, "kappa": None}
    if items:
        raters = Counter(len(g) for g in items.values()).most_common(1)[0][0]
        chosen = [g for g in items.values() if len(g) == raters]
        table = np.zeros((len(chosen), len(LABELS)))
        for row, group in enumerate(chosen):
            for j in group:
                table[row, index[j.label]] += 1
        fleiss = {"items": len(chosen), "raters": raters, "kappa": _kappa(fleiss_kappa, table)}
    return {
        "items": len(items),
        "pairs": pairs,
        "raw": agreeing / pairs if pairs else None,
        "cohen": cohen,
        "cohen_mean": sum(defined) / len(defined) if defined else None,
        "fleiss": fleiss,
    }


def compute(judgements: list[Judgement], skipped: dict[str, int], overlap: int) -> dict:
    groups = by_item(judgements)
    strengths = Counter(j.strength for j in judgements if j.strength is not None)
    flags = Counter(flag for j in judgements for answer_flags in j.flags.values() for flag in answer_flags)
    judged_by = Counter(j.reviewer for j in judgements)
    preferences = [j for j in judgements if j.chose_left is not None]
    return {
        "overlap": overlap,
        "verdicts": len(judgements),
        "items": {"judged": len(groups), "complete": sum(len(g) >= overlap for g in groups.values())},
        "labels": {label: sum(j.label == label for j in judgements) for label in LABELS},
        "win_rate": win_rates(judgements, overlap),
        # complete pairs the win rates leave out: both answers one text
        "identical_pairs": sum(g[0].kind == "pair" and g[0].same_text and len(g) >= overlap for g in groups.values()),
        "agreement": agreement(judgements),
        "strength": {str(s): strengths[s] for s in STRENGTHS},
        "flags": {flag: flags[flag] for flag in FLAGS},
        "reviewers": [{"reviewer": r, "judged": judged_by[r], "skipped": skipped.get(r, 0)}
                      for r in sorted(set(judged_by) | set(skipped))],
        # A large departure from 0.5 means reviewers favour a screen position: the order is random.
        "left_preferred": sum(j.chose_left for j in preferences) / len(preferences) if preferences else None,
    }


def for_reviewer(result: dict, own: str, secret_order: Callable[[str], str]) -> dict:
    """`compute`'s result as a reviewer (not an admin) sees it, without which model won (win rates, and the served
    and candidate counts, are an admin's): other reviewers are "reviewer 1", "reviewer 2", ...
    so a reviewer sees the team's counts and agreement but not who judged how much or agreed with whom. They are
    numbered and listed in the order of `secret_order` (a keyed digest of the label), not by name: an alphabetical
    numbering would let anyone who knows the team's names undo it."""
    rank = {name: i for i, name in enumerate(sorted((r["reviewer"] for r in result["reviewers"]), key=secret_order))}
    numbers = (n for n in count(1) if f"reviewer {n}" != own)  # a reviewer may be named "reviewer 2" themselves
    alias = {name: name if name == own else f"reviewer {next(numbers)}" for name in rank}
    cohen = [{**pair, "reviewers": [alias[r] for r in sorted(pair["reviewers"], key=rank.__getitem__)]}
             for pair in sorted(result["agreement"]["cohen"], key=lambda p: sorted(rank[r] for r in p["reviewers"]))]
    reviewers = [{**r, "reviewer": alias[r["reviewer"]]}
                 for r in sorted(result["reviewers"], key=lambda r: rank[r["reviewer"]])]
    # Blind A/B: which model won, or the served-vs-candidate counts moving after one's own verdict, would tell a
    # reviewer which side each model wrote. They see that one answer was preferred, not whose.
    labels = {label: n for label, n in result["labels"].items() if label not in ("served", "candidate")}
    labels["one_preferred"] = result["labels"].get("served", 0) + result["labels"].get("candidate", 0)
    return {**result, "reviewers": reviewers, "agreement": {**result["agreement"], "cohen": cohen},
            "labels": labels, "win_rate": None}
