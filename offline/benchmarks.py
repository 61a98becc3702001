"""Benchmark loaders: local files in ../shared/data's layout (the default), or a data set's public hub name.

Every MCQ benchmark becomes `zephyr.schemas.MCQItem`s and GSM8K becomes `GSM8KItem`s, so the lm-eval tasks,
the letter-format scorer and the server client all read the same items in the same order."""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zephyr.mcq import LETTERS, MAX_OPTIONS, MIN_OPTIONS
from zephyr.schemas import MCQItem

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A benchmark that cannot be read; the message names the file or hub name and what to do."""


# lm-eval's mmlu STEM group, so our "stem" aggregate means what the published figures mean.
MMLU_STEM = frozenset({
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
    "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
})


@dataclass(frozen=True)
class GSM8KItem:
    id: str
    question: str
    solution: str  # the worked solution, "#### <answer>" removed
    answer: str  # the final number as written after "####", commas removed


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub: str  # public hub name, for users who have the hub
    hub_config: str | None
    splits: dict[str, str]  # our split name -> local path under the data folder
    eval_split: str  # the split reported (test where the local data has one)
    reader: Callable[[Path, str], list[Any]]
    hub_reader: Callable[[Any, str], list[Any]]


def _mcq(item_id: str, question: str, options: list[str], answer_index: int, **extra: Any) -> MCQItem | None:
    # Whitespace is normalized as the service does; duplicate options are kept (7 MMLU and 9 SciQ test questions
    # have them): a benchmark is scored whole, though the service would ask a client to fix such a question.
    options = [" ".join(str(option).split()) for option in options]
    if not question.strip() or not all(options) or not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        return None
    return MCQItem(id=item_id, question=question.strip(), options=options, answer=LETTERS[answer_index], **extra)


def _keep(items: list[MCQItem | None]) -> list[MCQItem]:
    return [item for item in items if item is not None]


# ARC: official jsonl; labels are letters or digits.
def _arc_row(row: dict[str, Any]) -> MCQItem | None:
    question = row["question"]
    labels = [str(c["label"]) for c in question["choices"]]
    return _mcq(row["id"], question["stem"], [c["text"] for c in question["choices"]],
                labels.index(str(row["answerKey"])))


def read_arc(path: Path, split: str) -> list[MCQItem]:
    with path.open(encoding="utf-8") as handle:
        return _keep([_arc_row(json.loads(line)) for line in handle if line.strip()])


def hub_arc(dataset: Any, split: str) -> list[MCQItem]:
    return _keep([_mcq(r["id"], r["question"], list(r["choices"]["text"]),
                       list(r["choices"]["label"]).index(r["answerKey"])) for r in dataset])


# MMLU: one headerless CSV per subject: question, A, B, C, D, answer letter.
def read_mmlu(folder: Path, split: str) -> list[MCQItem]:
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise DatasetError(f"no MMLU files matching *_{split}.csv in {folder}")
    items = []
    for file in files:
        subject = file.name.removesuffix(f"_{split}.csv")
        with file.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(row for row in csv.reader(handle) if row):  # a trailing blank line
                items.append(_mcq(f"{subject}-{split}-{number}", row[0], row[1:5], "ABCD".index(row[5].strip()),
                                  subject=subject))
    return _keep(items)


def hub_mmlu(dataset: Any, split: str) -> list[MCQItem]:
    counters: dict[str, int] = {}
    items = []
    for row in dataset:
        number = counters[row["subject"]] = counters.get(row["subject"], -1) + 1
        items.append(_mcq(f"{row['subject']}-{split}-{number}", row["question"], list(row["choices"]), row["answer"],
                          subject=row["subject"]))
    return _keep(items)


# SciQ: the correct answer and three distractors. Their order is shuffled with a seed per question, so the key
# is spread over A-D the same way on every run (a fixed position would reward a letter bias).
def _sciq_row(row: dict[str, Any], item_id: str) -> MCQItem | None:
    options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
    order = list(range(4))
    random.Random(item_id).shuffle(order)
    return _mcq(item_id, row["question"], [options[i] for i in order], order.index(0),
                support=(row.get("support") or None))


def read_sciq(path: Path, split: str) -> list[MCQItem]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return _keep([_sciq_row(row, f"sciq-{split}-{i}") for i, row in enumerate(rows)])


def hub_sciq(dataset: Any, split: str) -> list[MCQItem]:
    return _keep([_sciq_row(row, f"sciq-{split}-{i}") for i, row in enumerate(dataset)])


# OpenBookQA (Main): TSV with a header; choices as "(A) ... (B) ... (C) ... (D) ...".
_OBQA_CHOICES = re.compile(r"\(([A-D])\)\s*(.*?)\s*(?=\([A-D]\)|$)")


def read_openbookqa(path: Path, split: str) -> list[MCQItem]:
    items = []
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            pairs = _OBQA_CHOICES.findall(row["Choices"])
            if [letter for letter, _ in pairs] != ["A", "B", "C", "D"]:  # a letter twice: no four options
                continue
            choices = dict(pairs)
            items.append(_mcq(row["ID"], row["Question Stem"], list(choices.values()),
                              "ABCD".index(row["Answer Key"].strip())))
    return _keep(items)


def hub_openbookqa(dataset: Any, split: str) -> list[MCQItem]:
    return _keep([_mcq(r["id"], r["question_stem"], list(r["choices"]["text"]),
                       list(r["choices"]["label"]).index(r["answerKey"])) for r in dataset])


# GSM8K: {question, answer}; the final answer follows "####".
def _gsm8k_row(row: dict[str, Any], item_id: str) -> GSM8KItem:
    solution, marker, final = row["answer"].rpartition("####")
    if not marker or not final.strip():  # every item would be unanswerable, and the accuracy fall without a word
        raise ValueError(f"{item_id}'s answer has no final answer after \"####\"")
    return GSM8KItem(id=item_id, question=row["question"].strip(), solution=solution.strip(),
                     answer=final.strip().replace(",", ""))


def read_gsm8k(path: Path, split: str) -> list[GSM8KItem]:
    with path.open(encoding="utf-8") as handle:
        return [_gsm8k_row(json.loads(line), f"gsm8k-{split}-{i}") for i, line in enumerate(handle) if line.strip()]


def hub_gsm8k(dataset: Any, split: str) -> list[GSM8KItem]:
    return [_gsm8k_row(row, f"gsm8k-{split}-{i}") for i, row in enumerate(dataset)]


BENCHMARKS: dict[str, Benchmark] = {
    "arc_easy": Benchmark("arc_easy", "allenai/ai2_arc", "ARC-Easy", {
        "train": "arc/ARC-Easy/ARC-Easy-Train.jsonl", "validation": "arc/ARC-Easy/ARC-Easy-Dev.jsonl",
        "test": "arc/ARC-Easy/ARC-Easy-Test.jsonl"}, "test", read_arc, hub_arc),
    "arc_challenge": Benchmark("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", {
        "train": "arc/ARC-Challenge/ARC-Challenge-Train.jsonl",
        "validation": "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl",
        "test": "arc/ARC-Challenge/ARC-Challenge-Test.jsonl"}, "test", read_arc, hub_arc),
    "mmlu": Benchmark("mmlu", "cais/mmlu", "all", {"dev": "mmlu/dev", "validation": "mmlu/val", "test": "mmlu/test"},
                      "test", read_mmlu, hub_mmlu),
    "sciq": Benchmark("sciq", "allenai/sciq", None, {"validation": "sciq/valid.json", "test": "sciq/test.json"},
                      "test", read_sciq, hub_sciq),
    # The local OpenBookQA copy has no test split: its dev split is what we report, from the hub too (figures compare).
    "openbookqa": Benchmark("openbookqa", "allenai/openbookqa", "main", {
        "train": "openbookqa/train.tsv", "validation": "openbookqa/dev.tsv"}, "validation", read_openbookqa,
        hub_openbookqa),
    "gsm8k": Benchmark("gsm8k", "openai/gsm8k", "main", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
                       "test", read_gsm8k, hub_gsm8k),
}
MCQ_BENCHMARKS = ("arc_easy", "arc_challenge", "mmlu", "sciq", "openbookqa")
# What `zephyr eval calibrate` fits /mcq's `auto` on: each MCQ benchmark's validation split, or its train split where
# validation is the split we report (OpenBookQA), then only the first CALIBRATION_LIMITS questions. Training builders
# that must not see calibration questions (training/data/cloze.py) read the same two tables.
CALIBRATION_SPLITS = {name: "train" if BENCHMARKS[name].eval_split == "validation" else "validation"
                      for name in MCQ_BENCHMARKS}
CALIBRATION_LIMITS = {"openbookqa": 500}  # as many as its dev split, from the train split's start
_MMLU_LOCAL_SPLITS = {"dev": "dev", "validation": "val", "test": "test"}
_HUB_SPLITS = {"validation": "validation", "dev": "dev"}


def load(name: str, split: str | None = None, source: str | Path | None = None, data_dir: Path | None = None,
         limit: int | None = None) -> list[Any]:
    """Items of benchmark `name`. `source` is a local file/folder in the original format or a hub name
    ("allenai/sciq"); without it the file comes from `data_dir` in ../shared/data's layout."""
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    split = split or bench.eval_split
    local: Path | None = None
    if source is not None and Path(source).expanduser().exists():
        local = Path(source).expanduser()
    elif source is not None:
        if not _hub_name(str(source)):
            owner = str(source).split("/", 1)[0]
            raise DatasetError(f"{source} does not exist" + (
                f" (a folder {owner}/ here makes it a path: for the hub data set of that name, run from another "
                "folder)" if Path(owner).is_dir() else f" (and is no hub name like {bench.hub})"))
        return first(_checked(name, source, lambda: _from_hub(bench, str(source), split)), limit)
    else:
        if split not in bench.splits:
            raise DatasetError(f"{name} has no local {split!r} split; local splits: {', '.join(bench.splits)}")
        if data_dir is None:
            raise DatasetError("no data folder: set ZEPHYR_DATA_DIR (a folder in ../shared/data's layout)")
        local = Path(data_dir) / bench.splits[split]
        if not local.exists():
            raise DatasetError(f"{local} does not exist: set ZEPHYR_DATA_DIR to a folder in ../shared/data's "
                               f"layout, or pass a file or the hub name {bench.hub}")
    try:
        items = _checked(name, local, lambda: bench.reader(local, _MMLU_LOCAL_SPLITS.get(split, split)
                                                           if name == "mmlu" else split))
    except OSError as exc:  # a folder where a file belongs, a file it may not read
        what = "a folder of *_test.csv files" if name == "mmlu" else "a file"
        raise DatasetError(f"cannot read {local} as {name} data ({exc.strerror or exc}): give {what}") from exc
    return first(items, limit)


def _hub_name(source: str) -> bool:
    """"owner/name", not a path mistyped: a file's suffix, or a first part that is a local folder, says path (sent
    to the hub, it waited on retries and then said nothing of the missing file)."""
    owner = source.split("/", 1)[0]
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not Path(owner).exists()
            and Path(source).suffix.lower() not in (".json", ".jsonl", ".csv", ".tsv", ".gz"))


def _checked(name: str, where: Any, read: Callable[[], list[Any]]) -> list[Any]:
    """What `read` returns, with a row of another shape (a missing field, a number where text belongs, a torn
    CSV) and an empty result as DatasetError naming the data set and where it came from."""
    try:
        items = read()
    except DatasetError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, csv.Error) as exc:  # JSON's: ValueError
        raise DatasetError(f"{where} is not in {name}'s format ({type(exc).__name__}: {exc})") from exc
    if not items:
        raise DatasetError(f"{where} holds no {name} items")
    # Scores are kept by item id: a repeated id merged two questions, one scored with the other's options.
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DatasetError(f"{where} holds the {name} item id {item.id!r} twice; ids must be unique")
        seen.add(item.id)
    return items


def first(items: list[Any], limit: int | None) -> list[Any]:
    """The first `limit` items; for data with subjects (MMLU) taken in turn from each subject, so a limited run
    still covers every subject instead of the first few alphabetically."""
    if limit is not None and limit < 1:  # 0 is no "all", and a negative one would slice off the end
        raise ValueError(f"a limit must be at least 1 (None: every item), not {limit}")
    if limit is None or limit >= len(items):
        return items
    if not getattr(items[0], "subject", None):
        return items[:limit]
    by_subject: dict[str, list[Any]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    interleaved = [group[i] for i in range(max(map(len, by_subject.values())))
                   for group in by_subject.values() if i < len(group)]
    return interleaved[:limit]


def fingerprint(items: list[Any]) -> str:
    """A digest of the items as read (ids, texts, keys), in id order: two runs that read the same questions have
    the same one whatever path, hub name or row order they read them from, and a question changed under its id
    gives another. Fields left at their defaults do not count, so a field the schema gains later changes none."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda item: item.id):
        fields = item.model_dump(exclude_defaults=True) if isinstance(item, MCQItem) else dataclasses.asdict(item)
        digest.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:16]


def _from_hub(bench: Benchmark, hub_name: str, split: str) -> list[Any]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets comes with lm-eval
        raise DatasetError("reading a hub data set needs the `datasets` package (pip install 'zephyr-tutor[eval]')") \
            from exc
    try:
        dataset = datasets.load_dataset(hub_name, bench.hub_config, split=_HUB_SPLITS.get(split, split))
    except Exception as exc:  # offline, unknown name, no such split: all mean "use local files"
        raise DatasetError(f"could not load {hub_name} ({bench.hub_config or 'default'}) split {split} from the "
                           f"hub: {exc}. Without hub access, use local files (ZEPHYR_DATA_DIR)") from exc
    return bench.hub_reader(dataset, split)


def write_items(items: list[MCQItem], path: Path) -> Path:
    """MCQ items as JSON Lines, the file the lm-eval tasks read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(item.model_dump_json() + "\n")  # every column, so templates may name support
    return path


# --- MCQ training items ----------------------------------------------------------------------------------------
# Splits we may train (and calibrate quantization) on. Every split a benchmark reports (its eval_split, and any
# "test") stays out, so models are scored on questions they have not seen.


class SourceError(ValueError):
    """A "name:split" training source that cannot be read; the message says which and what to use instead."""


TRAINING_SOURCES: dict[str, tuple[str, str]] = {
    "arc_easy:train": ("arc_easy", "train"),
    "arc_challenge:train": ("arc_challenge", "train"),
    "sciq:validation": ("sciq", "validation"),  # SciQ has no local train split; test is what we report
    "openbookqa:train": ("openbookqa", "train"),  # the local dev split is what we report for OpenBookQA
    "mmlu:dev": ("mmlu", "dev"),
    "mmlu:validation": ("mmlu", "validation"),
}


def _check_source(source: str, usable: Sequence[str]) -> tuple[str, str]:
    name, sep, split = source.partition(":")
    if not sep or not name or not split:
        raise SourceError(f"MCQ source {source!r} is not name:split; known sources: {', '.join(usable)}")
    bench = BENCHMARKS.get(name)
    if split == "test" or (bench is not None and split == bench.eval_split):
        raise SourceError(f"refusing {source}: it is the split we report for {name}, and we never train on the split "
                         f"we report; use one of {', '.join(usable)}")
    if source not in TRAINING_SOURCES:
        raise SourceError(f"unknown MCQ training source {source!r}; known sources: {', '.join(usable)}")
    return TRAINING_SOURCES[source]


def check_mcq_sources(sources: list[str] | str, usable: Sequence[str] = tuple(TRAINING_SOURCES)
                      ) -> list[tuple[str, str, str]]:
    """(source, benchmark, split) for each "name:split" training source, or a SourceError naming what to fix (and
    the `usable` sources, which the caller's own rules allow); reads no data, so a CLI can refuse a bad list before
    loading anything."""
    if isinstance(sources, str):  # a lone "arc_easy:train" would otherwise be iterated letter by letter
        sources = [sources]
    if not sources:
        raise SourceError(f"no MCQ sources given; known sources: {', '.join(usable)}")
    duplicates = sorted(s for s, n in Counter(sources).items() if n > 1)
    if duplicates:
        raise SourceError(f"MCQ sources listed twice: {', '.join(duplicates)}; list each once")
    return [(source, *_check_source(source, usable)) for source in sources]


_NON_WORD = re.compile(r"[\W_]+")


def normalize_words(text: str) -> list[str]:
    """Lowercase, punctuation removed, whitespace collapsed: the form every match against benchmark text is made in
    (decontamination's n-grams, question_key). Punctuation becomes a space (not nothing) so "cell.The" and
    "cell. The" normalize alike."""
    return _NON_WORD.sub(" ", text.lower()).split()


ANSWER_VERDICTS = ("right", "wrong", "both", "neither")


def answer_verdict(answer: str, options: list[str], key: int) -> str:
    """Which options a free-text answer names, read against the question's options (the answer asked without them):
    `right` names the key's text and no distractor's, `wrong` a distractor's and not the key's, `both` or `neither`.
    Words are matched whole, case and punctuation aside, so "carbon" is not named by "carbonate"; an option whose
    words sit inside another's ("carbon" in "carbon dioxide") is named with it, so such an answer reads `both`: a
    lower bound on right answers, as an answer may also say the key in other words."""
    said = f" {' '.join(normalize_words(answer))} "
    named = [f" {' '.join(words)} " in said if (words := normalize_words(option)) else False for option in options]
    others = any(n for i, n in enumerate(named) if i != key)
    if named[key]:
        return "both" if others else "right"
    return "wrong" if others else "neither"


def question_key(question: str, options: list[str]) -> tuple[str, frozenset[str]]:
    """A question as asked: its words (case, punctuation and spacing aside) and its set of options (in any order)."""
    return " ".join(normalize_words(question)), frozenset(" ".join(normalize_words(o)) for o in options)


def without_questions_of(items: list[MCQItem], others: list[MCQItem]) -> list[MCQItem]:
    """`items` without any question `others` asks too (question_key: the same words and options, whatever the id or
    the options' order): splits repeat questions under other ids, so leaving out by id alone lets copies through."""
    asked = {question_key(item.question, item.options) for item in others}
    return [item for item in items if question_key(item.question, item.options) not in asked]


@functools.lru_cache(maxsize=4)
def reported_questions(data_dir: Path) -> dict[tuple[str, frozenset[str]], str]:
    """question_key -> "benchmark/id" of every question in an MCQ benchmark's reported split under `data_dir` (those
    the folder has). Text decontamination (training/data/clean.py) matches stems of five words or more; this catches
    the short ones ("Who would be healthier?") that a training split repeats with the same options."""
    found = {}
    for name in MCQ_BENCHMARKS:
        bench = BENCHMARKS[name]
        if (data_dir / bench.splits[bench.eval_split]).exists():
            for item in load(name, bench.eval_split, data_dir=data_dir):
                found.setdefault(question_key(item.question, item.options), f"{name}/{item.id}")
    return found


def reported_copy(item: MCQItem, data_dir: Path) -> str | None:
    """"benchmark/id" of the reported question `item` repeats (the same question with the same options, in any
    order), or None: the rule every builder and calibration leaves questions out by. `data_dir` resolved by the
    caller, once: the reported questions are read once per folder (`reported_questions`)."""
    return reported_questions(data_dir).get(question_key(item.question, item.options))


def mcq_training_items(sources: list[str], data_dir: Path, limit_per_source: int | None = None,
                       exclude_reported: bool = True) -> list[MCQItem]:
    """MCQ items from "name:split" training sources, in the order given, without any question a reported split
    holds with the same options (unless `exclude_reported` is off: `--no-decontaminate`). Ids become
    "<source>/<original id>" so they stay unique across sources and say where each item came from."""
    checked = check_mcq_sources(sources)  # refuse before reading anything
    reported_dir = Path(data_dir).resolve()
    items: list[MCQItem] = []
    for source, name, split in checked:
        try:
            loaded = load(name, split, data_dir=Path(data_dir), limit=limit_per_source)
        except DatasetError as exc:
            raise SourceError(f"{source}: {exc}") from exc
        leaked = {item.id: hit for item in loaded if exclude_reported and (hit := reported_copy(item, reported_dir))}
        if leaked:
            log.warning("%s: left out %d question(s) a reported split holds with the same options (%s)", source,
                        len(leaked), ", ".join(f"{i} = {hit}" for i, hit in list(leaked.items())[:5]))
        items.extend(item.model_copy(update={"id": f"{source}/{item.id}"}) for item in loaded if item.id not in leaked)
    return items


# MCQ training sources outside what `zephyr eval calibrate` reads (OpenBookQA train loses its calibration head).
OUTSIDE_CALIBRATION = ("arc_easy:train", "arc_challenge:train", "openbookqa:train")


def check_sources_outside_calibration(sources: list[str] | str) -> list[tuple[str, str, str]]:
    """check_mcq_sources, refusing too a split `zephyr eval calibrate` reads whole (a validation split); reads no
    data, so a command can refuse before it makes anything."""
    def calibrated_whole(name: str, split: str) -> bool:
        return CALIBRATION_SPLITS.get(name) == split and not CALIBRATION_LIMITS.get(name, 0)

    usable = [source for source, place in TRAINING_SOURCES.items() if not calibrated_whole(*place)]
    checked = check_mcq_sources(sources, usable)  # not the validation splits this refuses below
    for source, name, split in checked:
        if calibrated_whole(name, split):
            raise SourceError(f"refusing {source}: `zephyr eval calibrate` fits /mcq's auto on it; use "
                              f"{', '.join(OUTSIDE_CALIBRATION)}")
    return checked


@functools.lru_cache(maxsize=4)
def calibration_questions(data_dir: Path) -> frozenset[tuple[str, frozenset[str]]]:
    """question_key of every question `zephyr eval calibrate` reads (CALIBRATION_SPLITS, CALIBRATION_LIMITS) under
    `data_dir`, of the splits the folder has: a training split may hold one under another id (MMLU dev's
    college_physics-dev-1 is val's college_physics-val-5, options and all)."""
    keys = set()
    for name in MCQ_BENCHMARKS:
        try:
            items = load(name, CALIBRATION_SPLITS[name], data_dir=data_dir, limit=CALIBRATION_LIMITS.get(name))
        except DatasetError:  # a folder without that benchmark: none of its questions to keep out
            continue
        keys |= {question_key(item.question, item.options) for item in items}
    return frozenset(keys)


def items_outside_calibration(sources: list[str], data_dir: Path, limit_per_source: int | None = None,
                              exclude_reported: bool = True) -> tuple[list[MCQItem], dict[str, int]]:
    """Training items of each "name:split" source (mcq_training_items), without the questions `zephyr eval
    calibrate` fits /mcq's `auto` on: what trains or quantizes a model that calibration then measures must not have
    seen them. A split calibration reads whole (a validation split) is refused, naming OUTSIDE_CALIBRATION instead;
    one it reads a head of (OpenBookQA train) loses that head. Returns the items and, per source, how many were
    left out."""
    checked = check_sources_outside_calibration(sources)
    items: list[MCQItem] = []
    reserved: dict[str, int] = {}
    # Left out by question, not id: OpenBookQA train repeats some of its head's questions, with the same options,
    # under other ids, and other splits hold calibration questions under ids of their own.
    calibrated = calibration_questions(Path(data_dir).resolve())
    for source, _, _ in checked:
        loaded = mcq_training_items([source], data_dir, exclude_reported=exclude_reported)
        kept = [item for item in loaded if question_key(item.question, item.options) not in calibrated]
        reserved[source] = len(loaded) - len(kept)
        items.extend(first(kept, limit_per_source) if limit_per_source else kept)  # MMLU: each subject in turn
    return items, {source: n for source, n in reserved.items() if n}
