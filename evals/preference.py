"""Preference statistics: reward-model scores and win rates, and what human reviewers said.

Reward models are the sequence classifiers `training/` makes with TRL's RewardTrainer, scored through
`offline.reward.RewardModel`. Human preferences come from `zephyr review export --format dpo`
(service/review/export.py): TRL conversational pairs whose `meta` names the model behind each answer."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from offline.reward import Conversation, pair_agreement
from offline.stats import wilson
from zephyr.clock import utc
from zephyr.registry import ModelManifest


class Scorer(Protocol):
    def score(self, conversations: list[Conversation], batch_size: int = ...) -> list[float]: ...


def score_stats(scores: list[float]) -> dict[str, float | int]:
    """n, mean, median, std (sample standard deviation, ddof=1; 0.0 for one score), min, max; NaN when empty."""
    import numpy as np

    n = len(scores)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "median": nan, "std": nan, "min": nan, "max": nan}
    values = np.asarray(scores, dtype=float)
    return {"n": n, "mean": float(values.mean()), "median": float(np.median(values)),
            "std": float(values.std(ddof=1)) if n > 1 else 0.0, "min": float(values.min()),
            "max": float(values.max())}


def scored_in_common(a: Mapping[str, float], b: Mapping[str, float]) -> list[str]:
    """The item ids both score sets hold, each scored a number on both sides (a NaN score compares with nothing)."""
    return sorted(i for i in set(a) & set(b) if math.isfinite(a[i]) and math.isfinite(b[i]))


def rm_win_rate(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float | int]:
    """How often model A's answer out-scores model B's on the same item (`scored_in_common`), with its Wilson
    interval; ties count half."""
    common = scored_in_common(a, b)
    if not common:
        raise ValueError(f"no common item ids between the two score sets ({len(a)} and {len(b)} items)")
    wins = sum(a[i] > b[i] for i in common)
    losses = sum(a[i] < b[i] for i in common)
    ties = len(common) - wins - losses
    return {"wins": wins, "losses": losses, "ties": ties, "n": len(common),
            "win_rate": (wins + 0.5 * ties) / len(common), "ci95": wilson(wins + 0.5 * ties, len(common))}


# ----------------------------------------------------------------------------------------- human preferences


def read_export(source: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records of a `zephyr review export` file (a path), or records already read (dicts or pydantic models)."""
    if isinstance(source, str | Path):
        with Path(source).open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    return [r.model_dump() if hasattr(r, "model_dump") else dict(r) for r in source]


def counts_every_verdict(record: Mapping[str, Any]) -> bool:
    """Whether a pair comes from an export that kept every decisive pair: with `--include-flagged` (a pair whose
    winner a reviewer flagged is still a win), `--include-unfinished` (a win with an answer cut off too) and no
    `--min-agreement` (which keeps items by how their verdicts came out), and not since filtered for training
    (`zephyr data review` and `zephyr data clean` stamp `for_training`)."""
    kept = (record.get("meta") or {}).get("kept") or {}
    return bool(kept.get("flagged") and kept.get("unfinished") and not kept.get("min_agreement")
                and not kept.get("for_training"))


def _is_pair(record: Mapping[str, Any]) -> bool:
    return "chosen" in record and "rejected" in record


def registry_name(label: Any) -> str:
    """The registry name behind an export's model label: a resampled candidate (`m [T=1]`) is `m`'s."""
    return str(label or "").split(" [")[0]


def _by_these_weights(meta: Mapping[str, Any], side: str, entry: ModelManifest) -> bool:
    """Whether one answer of a pair was written by this registry entry's weights. Rows say which weights wrote them
    (`{side}_revision`, ModelManifest.revision); a pair without it (exported before rows said, or from a remote
    server that does not say) counts when it was answered on or after the entry was made."""
    if written_by := meta.get(f"{side}_revision"):
        return written_by == entry.revision
    try:
        answered = datetime.fromisoformat(meta.get("created_at"))
    except (TypeError, ValueError):
        return False  # neither which weights nor when: it cannot show what it judged
    return utc(answered) >= entry.created_at_utc


def by_these_weights(records: list[dict[str, Any]], entries: Mapping[str, ModelManifest]
                     ) -> tuple[list[dict[str, Any]], int]:
    """The records without the pairs other weights of a model's name wrote, and how many those were. Reviews name
    models by name: a model retrained or requantized under its name starts with no verdicts. `entries` maps
    registry names to their manifests; a resampled candidate (`m [T=1]`) is `m`'s."""
    kept, stale = [], 0
    for record in records:
        meta = record.get("meta") or {}
        sides = {side: registry_name(meta.get(f"{side}_model")) for side in ("chosen", "rejected")}
        if _is_pair(record) and not all(_by_these_weights(meta, side, entries[name])
                                        for side, name in sides.items() if name in entries):
            stale += 1
            continue
        kept.append(record)
    return kept, stale


def human_win_rates(records: str | Path | Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Win rates from exported human DPO pairs.

    The export's `meta` carries, per pair: `label` (which answer won: "served", the one the student got, or
    "candidate", the second answer reviewers saw), `chosen_model` / `rejected_model` (a resampled candidate of
    the served model reads e.g. `m [T=1]`), `chosen_id` / `rejected_id`, `item_ids`, `reviewers`, `agreement`
    and `strength`. Ties and both-bad verdicts never become DPO pairs, so every pair is a decisive win: these
    rates leave ties out (the review page's /review/stats counts them). A pair is counted once even when the
    export merged several identical items into it (`item_ids`)."""
    pairs = [r for r in read_export(records) if _is_pair(r)]
    served = Counter()
    per_model: dict[str, Counter] = defaultdict(Counter)
    head: dict[tuple[str, str], Counter] = defaultdict(Counter)
    unnamed = 0
    for record in pairs:
        meta = record.get("meta") or {}
        if meta.get("label") in ("served", "candidate"):
            served[meta["label"]] += 1
        winner, loser = meta.get("chosen_model"), meta.get("rejected_model")
        if not winner or not loser:
            unnamed += 1
            continue
        if winner == loser:  # two unlabelled samples of one model say nothing about models: no win, no loss
            continue
        per_model[winner]["wins"] += 1
        per_model[loser]["losses"] += 1
        a, b = sorted((winner, loser))
        head[(a, b)]["a_wins" if winner == a else "b_wins"] += 1

    decided = served["served"] + served["candidate"]
    models = []
    for model in sorted(per_model):
        c = per_model[model]
        n = c["wins"] + c["losses"]
        models.append({"model": model, "wins": c["wins"], "losses": c["losses"], "n": n, "win_rate": c["wins"] / n,
                       "ci95": wilson(c["wins"], n)})
    matchups = []
    for (a, b), c in sorted(head.items()):
        n = c["a_wins"] + c["b_wins"]
        matchups.append({"a": a, "b": b, "a_wins": c["a_wins"], "b_wins": c["b_wins"], "n": n,
                         "a_win_rate": c["a_wins"] / n, "ci95": wilson(c["a_wins"], n)})
    return {
        "pairs": len(pairs),
        "without_models": unnamed,
        # pairs of an export that left out others (flagged, or with an answer cut off): not every verdict counts
        "from_filtered_export": sum(1 for r in pairs if not counts_every_verdict(r)),
        "served_vs_candidate": {"served_wins": served["served"], "candidate_wins": served["candidate"],
                                "n": decided, "served_win_rate": served["served"] / decided if decided else None,
                                "ci95": wilson(served["served"], decided)},
        "models": models,
        "head_to_head": matchups,
    }


def read_review_records(reviews: Path) -> list[dict[str, Any]]:
    """The records of a `zephyr review export --format dpo` file; ValueError saying what to do when the file is
    missing or is not such an export (the report and the gate read reviews through this)."""
    if not Path(reviews).is_file():
        raise ValueError(f"reviews file {reviews} does not exist: write one with "
                         f"`zephyr review export --format dpo --out FILE`")
    try:
        records = read_export(reviews)
        human_win_rates(records)  # every pair's fields are of the kinds an export writes
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise ValueError(f"{reviews} is not a `zephyr review export --format dpo` file (JSON Lines): {exc}") from None
    except OSError as exc:  # not readable: blamed on --out by the report, a traceback in the gate
        raise ValueError(f"cannot read reviews file {reviews}: {exc.strerror or exc}") from None
    return records


def _pair_id(record: Mapping[str, Any], number: int) -> str:
    item_ids = (record.get("meta") or {}).get("item_ids") or []
    return str(item_ids[0]) if item_ids else str(number)


def rm_human_agreement(rm: Scorer, pairs: str | Path | Iterable[Mapping[str, Any]],
                       batch_size: int = 8) -> dict[str, Any]:
    """`offline.reward.pair_agreement` on the human DPO pairs of a review export. `items` holds 1.0/0.0 per pair,
    keyed by the pair's first review item id (or its position), for paired comparisons."""
    records = [r for r in read_export(pairs) if _is_pair(r)]
    result = pair_agreement(rm, records, batch_size=batch_size)
    per_pair = result.pop("per_pair")
    return result | {"items": {_pair_id(r, n): agreed for n, (r, agreed) in enumerate(zip(records, per_pair,
                                                                                           strict=True))}}
