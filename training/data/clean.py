"""Cleaning for training records (PreferencePair, SFTExample, KTOExample, and the plain-text TextPreferencePair and
TextSFTExample, whose prompt and replies are strings: each counts as one message): PII redaction, benchmark
decontamination, length filters, exact and near-duplicate removal, with a report of what each stage did.

Stages run in this order, each on what the previous one kept:
  1. PII redaction of every message (records are kept; the count is of records changed),
  2. decontamination: a record any of whose messages overlaps a benchmark's eval questions is dropped,
  3. length filters on each assistant reply (characters) and on the whole rendered conversation (tokens),
  4. with deduplication: pairs whose chosen is their rejected, and a pair together with its opposite (both),
  5. exact duplicates (canonical JSON of the content; meta and source do not make two records different),
  6. near duplicates (MinHash LSH over word shingles, confirmed by exact Jaccard; a pair's replies compared
     chosen with chosen); the first occurrence stays.
Redaction runs first so the later stages compare what will actually be trained on."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel
from rich.table import Table

from offline.benchmarks import normalize_words
from zephyr.schemas import Message, Record, read_jsonl, write_jsonl

ALL_BENCHMARKS = ("arc_easy", "arc_challenge", "mmlu", "sciq", "openbookqa", "gsm8k")
MIN_WHOLE_WORDS = 5  # a shorter test question ("What is a cell?") is too generic to count as a match
EXAMPLES_PER_STAGE = 5
REPLY_FIELDS = ("chosen", "rejected", "completion")
MINHASH_PERM = 64
MINHASH_SEED = 1  # fixed, so the same data always loses the same records
CLEANED_KEY = "cleaned"  # meta key: the cleaning steps a record has been through (`stamped_cleaned`)

_MASK64 = (1 << 64) - 1


@dataclass
class CleanOptions:
    redact_pii: bool = True
    dedupe: bool = True  # exact duplicates (canonical JSON of content, meta/source excluded)
    near_dup_threshold: float | None = 0.9  # Jaccard on word shingles via datasketch MinHashLSH; None = off
    min_chars: int = 1  # each assistant reply (chosen/rejected/completion/last assistant message), stripped
    max_chars: int | None = 8000
    max_tokens: int | None = None  # whole conversation rendered with tokenizer.apply_chat_template
    decontaminate: bool = True
    ngram: int = 13  # word n-grams; shorter test questions (>= MIN_WHOLE_WORDS words) match whole
    shingle_words: int = 3  # near-dup shingle size: 3 lets one changed word in ~70 words still score >= 0.9

    def __post_init__(self) -> None:
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            raise ValueError(f"near_dup_threshold must be in (0, 1] or None, not {self.near_dup_threshold}")
        if self.ngram < 1 or self.shingle_words < 1:
            raise ValueError("ngram and shingle_words must be at least 1")
        if self.min_chars < 0 or (self.max_chars is not None and self.max_chars < self.min_chars):
            raise ValueError(f"bad length limits: min_chars={self.min_chars}, max_chars={self.max_chars}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, not {self.max_tokens}")

    def steps(self) -> list[str]:
        """The steps these options run, as a record's `meta.cleaned` names them."""
        lengths = self.min_chars > 0 or self.max_chars is not None or self.max_tokens is not None
        return [step for step, runs in (("pii", self.redact_pii), ("decontaminate", self.decontaminate),
                                        ("length", lengths), ("dedupe", self.dedupe),
                                        ("near_dup", self.near_dup_threshold is not None)) if runs]


@dataclass
class CleanReport:
    """Records per stage. `pii_redacted` counts records changed (kept); every other stage counts records
    dropped, so input - removed == output. A record overlapping several benchmarks is counted once, under
    the first in the index's order (its example line names all of them)."""

    input: int = 0
    unfit_for_training: int = 0  # a raw review export's records kept for counting verdicts (`unfit_for_training`)
    pii_redacted: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    too_short: int = 0
    too_long: int = 0
    no_preference: int = 0  # a pair whose chosen is its rejected, spacing aside (PII redaction can make them so)
    conflicting: int = 0  # a pair and its opposite (two reviewers disagreeing): both dropped
    contaminated: dict[str, int] = field(default_factory=dict)
    output: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return (self.unfit_for_training + sum(self.contaminated.values()) + self.too_short + self.too_long
                + self.no_preference + self.conflicting + self.exact_duplicates + self.near_duplicates)

    def note(self, stage: str, index: int, description: str) -> None:
        shown = self.examples.setdefault(stage, [])
        if len(shown) < EXAMPLES_PER_STAGE:
            shown.append(f"#{index}: {description}")

    def table(self) -> Table:
        table = Table(title="Training data cleaning")
        table.add_column("stage")
        table.add_column("records", justify="right")
        table.add_column("examples", overflow="fold")

        def row(label: str, count: int, stage: str | None = None) -> None:
            table.add_row(label, str(count), "\n".join(self.examples.get(stage, [])) if stage else "")

        row("input", self.input)
        if self.unfit_for_training:
            row("unfit for training (a review export's cut-off, guard or flagged answers)", self.unfit_for_training,
                "unfit_for_training")
        row("PII redacted (kept)", self.pii_redacted, "pii_redacted")
        for name, count in self.contaminated.items():
            row(f"contaminated: {name}", count)
        if self.contaminated:
            table.add_row("", "", "\n".join(self.examples.get("contaminated", [])))
        row("too short", self.too_short, "too_short")
        row("too long", self.too_long, "too_long")
        if self.no_preference:
            row("chosen is rejected", self.no_preference, "no_preference")
        if self.conflicting:
            row("conflicting (a pair and its opposite: both)", self.conflicting, "conflicting")
        row("exact duplicates", self.exact_duplicates, "exact_duplicates")
        row("near duplicates", self.near_duplicates, "near_duplicates")
        row("output", self.output)
        return table

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "removed": self.removed}


class ContaminationIndex:
    """Word n-grams of benchmark eval questions, per benchmark. A text matches a benchmark when it shares
    an n-gram with one of its questions, or contains a short question (MIN_WHOLE_WORDS..ngram-1 words) whole.

    Text found in more than `max_df` questions of one benchmark is a template, not a question, and is
    ignored: MMLU's moral-scenarios preamble alone is in ~900 test questions, and stems such as "Which of the
    following is true?" (8 MMLU questions) would otherwise flag any tutoring text that asks it.
    Hashes use Python's per-process string hash: the index lives in memory only and is never saved."""

    def __init__(self, ngram: int, grams: dict[str, set[int]], whole: dict[str, dict[int, set[int]]],
                 sizes: dict[str, int]):
        self.ngram = ngram
        self._grams = grams
        self._whole = whole  # benchmark -> word count -> hashes of whole normalized questions
        self.sizes = sizes  # questions indexed per benchmark
        self._lengths = sorted({length for by_length in whole.values() for length in by_length})

    @property
    def names(self) -> list[str]:
        return list(self._grams)

    @classmethod
    def from_texts(cls, texts: dict[str, list[str]], ngram: int = 13, max_df: int | None = 3,
                   passages: dict[str, list[str]] | None = None) -> ContaminationIndex:
        """`texts`: questions, matched by n-gram and, when shorter, whole. `passages`: matched by n-gram only (a
        short passage is a textbook sentence any explanation may state, not a question to be leaked)."""
        if ngram < 1:
            raise ValueError("ngram must be at least 1")
        grams: dict[str, set[int]] = {}
        whole: dict[str, dict[int, set[int]]] = {}
        for name, questions in texts.items():
            gram_df: Counter[int] = Counter()
            whole_df: Counter[tuple[int, int]] = Counter()
            for passage in (passages or {}).get(name, []):
                if len(words := normalize_words(passage)) >= ngram:
                    gram_df.update(_ngram_hashes(words, ngram))
            for question in questions:
                words = normalize_words(question)
                if len(words) >= ngram:
                    gram_df.update(_ngram_hashes(words, ngram))
                elif len(words) >= MIN_WHOLE_WORDS:
                    whole_df[len(words), hash(" ".join(words))] += 1
            grams[name] = {h for h, n in gram_df.items() if max_df is None or n <= max_df}
            whole[name] = {}
            for (length, h), n in whole_df.items():
                if max_df is None or n <= max_df:
                    whole[name].setdefault(length, set()).add(h)
        return cls(ngram, grams, whole, {name: len(questions) for name, questions in texts.items()})

    @classmethod
    def from_benchmarks(cls, data_dir: Path | str, names: Sequence[str] = ALL_BENCHMARKS, ngram: int = 13,
                        max_df: int | None = 3) -> ContaminationIndex:
        """Each benchmark's reported split (`Benchmark.eval_split`): MCQ stems and GSM8K questions, and SciQ's
        support passages (the text suite scores chat answers by their overlap with them: a training answer that
        repeats one would inflate that score)."""
        from offline.benchmarks import BENCHMARKS, load

        texts: dict[str, list[str]] = {}
        passages: dict[str, list[str]] = {}
        for name in names:
            if name not in BENCHMARKS:
                raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
            bench = BENCHMARKS[name]
            path = Path(data_dir) / bench.splits[bench.eval_split]
            # Checked here so the error says what needs the file and how to go without it.
            if not path.exists():
                raise FileNotFoundError(
                    f"decontamination needs {name}'s {bench.eval_split} split, but {path} does not exist; set "
                    f"ZEPHYR_DATA_DIR to a folder in ../shared/data's layout, name only the benchmarks you have "
                    f"(--against), or skip the check (--no-decontaminate)")
            items = load(name, bench.eval_split, data_dir=Path(data_dir))
            texts[name] = [item.question for item in items]
            passages[name] = [text for item in items if (text := getattr(item, "support", None))]  # MCQ items
        return cls.from_texts(texts, ngram=ngram, max_df=max_df, passages=passages)

    def matches(self, text: str) -> list[str]:
        """Benchmark names whose eval questions overlap `text`, in index order."""
        words = normalize_words(text)
        grams = _ngram_hashes(words, self.ngram) if len(words) >= self.ngram else set()
        windows = {length: _ngram_hashes(words, length) for length in self._lengths if length <= len(words)}
        found = []
        for name, bench_grams in self._grams.items():
            if not grams.isdisjoint(bench_grams) or any(
                    not windows.get(length, set()).isdisjoint(hashes)
                    for length, hashes in self._whole[name].items()):
                found.append(name)
        return found


def _ngram_hashes(words: list[str], n: int) -> set[int]:
    return {hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


# Record access, generic over the schemas: every field that is a list of Messages is conversation text, and so is
# a plain-text prompt or reply (a string, read as one user or assistant message).
TEXT_FIELDS = ("prompt", *REPLY_FIELDS)


def _message_fields(record: BaseModel) -> list[str]:
    return [name for name in type(record).model_fields
            if isinstance(value := getattr(record, name), list) and value and isinstance(value[0], Message)]


def _text_fields(record: BaseModel) -> list[str]:
    fields = type(record).model_fields
    return [name for name in TEXT_FIELDS if name in fields and isinstance(getattr(record, name), str)]


def _as_messages(record: BaseModel, name: str) -> list[Message]:
    value = getattr(record, name)
    if isinstance(value, str):
        return [Message(role="user" if name == "prompt" else "assistant", content=value)]
    return list(value)


def _messages(record: BaseModel) -> list[Message]:
    names = _message_fields(record) + _text_fields(record)
    return [message for name in names for message in _as_messages(record, name)]


def _replies(record: BaseModel) -> list[tuple[str, str]]:
    """(label, text) of each reply whose length is checked: chosen/rejected/completion, else the last
    assistant message of an SFT conversation ("" when there is none, so it fails min_chars)."""
    fields = type(record).model_fields
    replies = [(name, "\n".join(m.content for m in _as_messages(record, name))) for name in REPLY_FIELDS
               if name in fields]
    if not replies and "messages" in fields:
        assistant = [m.content for m in record.messages if m.role == "assistant"]  # type: ignore[attr-defined]
        replies = [("last assistant message", assistant[-1] if assistant else "")]
    return replies


def _conversations(record: BaseModel) -> list[list[Message] | str]:
    """What a trainer renders: prompt + each reply for pairs and KTO (plain text: the strings joined), the messages
    for SFT."""
    fields = type(record).model_fields
    if "prompt" in fields:
        # a prompt with no reply (GRPO's verifiable prompts) is rendered alone
        return [record.prompt + getattr(record, name) for name in REPLY_FIELDS  # type: ignore[attr-defined]
                if name in fields] or [record.prompt]  # type: ignore[attr-defined]
    return [_messages(record)]


def _token_count(tokenizer: Any, conversation: list[Message] | str) -> int:
    # Render to text, then tokenize: apply_chat_template(tokenize=True) returns ids or a dict by version.
    text = conversation if isinstance(conversation, str) else tokenizer.apply_chat_template(
        [m.model_dump() for m in conversation], tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _snippet(record: BaseModel, width: int = 60) -> str:
    messages = _messages(record)
    first = next((m.content for m in messages if m.role == "user"), messages[0].content if messages else "")
    text = " ".join(first.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def _redact(record: Record, redactor: Any) -> Record:
    update = {}
    for name in _message_fields(record):
        messages = getattr(record, name)
        redacted = [m.model_copy(update={"content": redactor.redact(m.content)}) for m in messages]
        if any(a.content != b.content for a, b in zip(messages, redacted, strict=True)):
            update[name] = redacted
    for name in _text_fields(record):
        if (redacted_text := redactor.redact(getattr(record, name))) != getattr(record, name):
            update[name] = redacted_text
    return record.model_copy(update=update) if update else record


def _content_key(record: BaseModel) -> bytes:
    content = record.model_dump(exclude={"meta", "source"})
    canonical = json.dumps([type(record).__name__, content], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


def _shingles(record: BaseModel, size: int, replies_only: bool = False) -> set[str]:
    if replies_only:  # each reply's own, tagged by its field: a pair and its opposite share none
        return {f"{label}:{shingle}" for label, text in _replies(record) for shingle in _word_shingles(text, size)}
    return _word_shingles("\n".join(m.content for m in _messages(record)), size)


def _word_shingles(text: str, size: int) -> set[str]:
    words = normalize_words(text)
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def _read_as(record: BaseModel, name: str) -> str:
    """A field's text as these rules compare it: spacing aside, case and signs kept (a cloze pair " rr" / " RR", or
    " -2 m/s" / " 2 m/s", is a real preference)."""
    return " ".join("\n".join(m.content for m in _as_messages(record, name)).split())


def _drop_pairs_without_one_preference(kept: list[tuple[int, Record]], report: CleanReport
                                       ) -> list[tuple[int, Record]]:
    """Pairs whose chosen is their rejected (a hand-made file; two answers PII redaction made alike) teach
    nothing; a pair and its opposite (P: A over B, and P: B over A: two reviewers disagreeing) teach both ways,
    and near-duplicate removal kept whichever came first: both are dropped."""
    # Each pair's prompt and its two replies in either order (None: no pair), and the replies chosen under it.
    survivors: list[tuple[int, Record, tuple[str, ...] | None]] = []
    orientation: dict[tuple[str, ...], set[str]] = {}
    for i, record in kept:
        if "chosen" not in type(record).model_fields:
            survivors.append((i, record, None))
            continue
        prompt, chosen, rejected = (_read_as(record, name) for name in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            report.no_preference += 1
            report.note("no_preference", i, _snippet(record))
            continue
        key = (prompt, *sorted((chosen, rejected)))
        orientation.setdefault(key, set()).add(chosen)
        survivors.append((i, record, key))
    kept = []
    for i, record, key in survivors:
        if key is not None and len(orientation[key]) > 1:
            report.conflicting += 1
            report.note("conflicting", i, _snippet(record))
        else:
            kept.append((i, record))
    return kept


def clean(records: Iterable[Record], options: CleanOptions | None = None, *, index: ContaminationIndex | None = None,
          redactor: Any = None, tokenizer: Any = None) -> tuple[list[Record], CleanReport]:
    """Cleaned records (same types, input order) and the report. Without `index`, decontamination indexes
    every benchmark in Settings().data_dir; without `redactor`, one is built from Settings(). The index's own
    n-gram size is used when one is passed."""
    options = options or CleanOptions()
    if options.max_tokens is not None and tokenizer is None:
        raise ValueError("max_tokens needs a tokenizer (with a chat template) to count tokens: pass tokenizer=, "
                         "or set max_tokens=None")
    records = list(records)
    report = CleanReport(input=len(records))
    kept: list[tuple[int, Record]] = list(enumerate(records))  # input positions, for the report's examples

    # A raw review export keeps what `eval gate --reviews` counts (answers cut off or the guard's, chosen answers a
    # reviewer flagged): left out here as `zephyr data review` leaves them out, since cleaning stamps the file fit to
    # train on. A file `data review` already filtered (`for_training`) is left as it chose.
    survivors = []
    for i, record in kept:
        meta = getattr(record, "meta", None)
        if raw_review_export(meta) and (why := unfit_for_training(meta)):
            report.unfit_for_training += 1
            report.note("unfit_for_training", i, f"{why}: {_snippet(record)}")
        else:
            survivors.append((i, record))
    kept = survivors

    if options.redact_pii:
        if redactor is None:
            from zephyr.pii import Redactor
            from zephyr.settings import Settings

            settings = Settings()
            redactor = Redactor(settings.pii_entities, settings.student_id_pattern)
        redacted = []
        for i, record in kept:
            new = _redact(record, redactor)
            if new is not record:
                report.pii_redacted += 1
                report.note("pii_redacted", i, _snippet(new))
            redacted.append((i, new))
        kept = redacted

    if options.decontaminate:
        if index is None:
            from zephyr.settings import Settings

            index = ContaminationIndex.from_benchmarks(Settings().data_dir, ngram=options.ngram)
        report.contaminated = dict.fromkeys(index.names, 0)
        survivors = []
        for i, record in kept:
            found: list[str] = []
            for message in _messages(record):
                found += [name for name in index.matches(message.content) if name not in found]
            if found:
                # Counted once, under the first benchmark, so input - removed == output.
                first = next(name for name in index.names if name in found)
                report.contaminated[first] += 1
                report.note("contaminated", i, f"{', '.join(found)}: {_snippet(record)}")
            else:
                survivors.append((i, record))
        kept = survivors

    survivors = []
    for i, record in kept:
        lengths = [(label, len(text.strip())) for label, text in _replies(record)]
        short = [f"{label} {n} chars" for label, n in lengths if n < options.min_chars]
        long = [f"{label} {n} chars" for label, n in lengths if options.max_chars is not None and n > options.max_chars]
        if not short and not long and options.max_tokens is not None:
            tokens = max(_token_count(tokenizer, conversation) for conversation in _conversations(record))
            if tokens > options.max_tokens:
                long = [f"{tokens} tokens"]
        if short:
            report.too_short += 1
            report.note("too_short", i, f"{'; '.join(short)}: {_snippet(record)}")
        elif long:
            report.too_long += 1
            report.note("too_long", i, f"{'; '.join(long)}: {_snippet(record)}")
        else:
            survivors.append((i, record))
    kept = survivors

    if options.dedupe:
        kept = _drop_pairs_without_one_preference(kept, report)
        seen: dict[bytes, int] = {}
        survivors = []
        for i, record in kept:
            key = _content_key(record)
            if key in seen:
                report.exact_duplicates += 1
                report.note("exact_duplicates", i, f"same as #{seen[key]}: {_snippet(record)}")
            else:
                seen[key] = i
                survivors.append((i, record))
        kept = survivors

    if options.near_dup_threshold is not None:
        kept = _drop_near_duplicates(kept, options, report)

    report.output = len(kept)
    steps = options.steps()
    # A review export's records (their meta says what the export `kept`) no longer hold every verdict once cleaned.
    return [stamped_cleaned(filtered_for_training(r) if "kept" in r.meta else r, steps)
            if isinstance(getattr(r, "meta", None), dict) else r for _, r in kept], report


def stamped_cleaned(record: Record, steps: list[str] | bool) -> Record:
    """`record` with `meta.cleaned` saying which cleaning steps it has been through (those of earlier cleanings
    kept), or False: written with --no-clean, which `zephyr train` refuses until `zephyr data clean` has run on it
    (`cleaning_of`)."""
    before = record.meta.get(CLEANED_KEY)
    if steps is not False and isinstance(before, list):
        steps = [*before, *(step for step in steps if step not in before)]
    return record.model_copy(update={"meta": {**record.meta, CLEANED_KEY: steps}})


def cleaning_of(meta: Any) -> str:
    """How a record's `meta.cleaned` stamp reads: "cleaned" (a list of steps with PII redaction and
    decontamination), "cleaned_partly" (a list without one of them: `--no-pii`, `--no-decontaminate`),
    "never_cleaned" (False: written with --no-clean; or a review export's record, `kept` but not `for_training`,
    that `zephyr data review` never read: students' own words) or "unstamped" (a hand-made file, or one from before
    the stamp)."""
    meta = meta if isinstance(meta, dict) else {}
    stamp = meta.get(CLEANED_KEY)
    if isinstance(stamp, list):
        return "cleaned" if {"pii", "decontaminate"} <= set(stamp) else "cleaned_partly"
    return "never_cleaned" if stamp is False or (stamp is None and raw_review_export(meta)) else "unstamped"


def raw_review_export(meta: Any) -> bool:
    """Whether a record's meta is a review export's as exported (`kept` says what the export left out), not since
    filtered for training by `zephyr data review` or `zephyr data clean` (`for_training`)."""
    return isinstance(meta, dict) and isinstance(meta.get("kept"), dict) and not meta["kept"].get("for_training")


def unfit_for_training(meta: dict[str, Any] | None, *, allow_unfinished: bool = False) -> str | None:
    """Why a review export's record was kept for counting verdicts but is no training example, else None.

    An export that keeps every verdict (`--include-unfinished`, `--include-flagged`: what `eval gate --reviews`
    counts) marks each record: `whole`, its answers ended by themselves and none is the safety guard's, and for a pair
    `chosen_flagged`, a reviewer flagged the preferred answer incorrect or unsafe. A record from before those marks is
    judged by its export's `kept`: what it may hold. `allow_unfinished` takes cut-off answers (a smoke test's)."""
    meta = meta or {}
    kept = meta.get("kept") or {}
    if not allow_unfinished and not meta.get("whole", not kept.get("unfinished", False)):
        return "an answer cut off at max_tokens or by the client's stop strings, or written by the safety guard"
    # a pair from before the marks may hold a flagged winner where its export kept them; a KTO or SFT record never
    if meta.get("chosen_flagged", "whole" not in meta and bool(kept.get("flagged", False))):
        return "a chosen answer a reviewer flagged incorrect or unsafe"
    return None


def filtered_for_training(record: Record) -> Record:
    """A review export's record stamped as filtered for training: what cleaning or `zephyr data review` leaves out
    would tilt the win rate `eval gate --reviews` reads, so such a file must not count as every verdict
    (evals/preference.py `counts_every_verdict`)."""
    kept = record.meta.get("kept") or {}
    return record.model_copy(update={"meta": {**record.meta, "kept": {**kept, "for_training": True}}})


def lsh_params(threshold: float, num_perm: int = MINHASH_PERM, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) that propose a pair at Jaccard `threshold` with probability >= `recall`. datasketch's own
    choice balances misses and false candidates equally, which at 64 permutations and 0.9 finds only ~30% of
    pairs right at the threshold; false candidates cost one exact check, so recall is what matters here."""
    for rows in range(num_perm // 2, 0, -1):  # more rows per band: fewer false candidates; bands >= 2
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def _hashed(shingles: set[str]) -> np.ndarray:
    return np.unique(np.fromiter((hash(s) & _MASK64 for s in shingles), dtype=np.uint64, count=len(shingles)))


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) and not len(b):
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def _drop_near_duplicates(kept: list[tuple[int, Record]], options: CleanOptions,
                          report: CleanReport) -> list[tuple[int, Record]]:
    from datasketch import MinHash, MinHashLSH

    threshold = options.near_dup_threshold
    assert threshold is not None
    # LSH only proposes candidates; the exact Jaccard of the shingle sets decides, so the threshold means what
    # it says. The replies alone must be near-duplicates too: one question answered "B" and "C" (or a long
    # prompt with two different short answers) is two records, not one. Only kept records are indexed.
    lsh = MinHashLSH(num_perm=MINHASH_PERM, params=lsh_params(threshold))
    # Shingles of kept records as sorted uint64 hashes: 8 bytes each, a fraction of a set of strings.
    shingle_sets: dict[int, np.ndarray] = {}
    reply_sets: dict[int, np.ndarray] = {}
    # A KTO answer marked good and the same answer marked bad are two verdicts, not duplicates (a label shingle
    # among a long reply's moved its Jaccard too little to tell them apart).
    labels: dict[int, Any] = {}
    survivors = []
    for i, record in kept:
        shingles = _shingles(record, options.shingle_words)
        replies = _hashed(_shingles(record, options.shingle_words, replies_only=True))
        if not shingles:  # no words to compare; exact dedupe already handled identical records
            survivors.append((i, record))
            continue
        minhash = MinHash(num_perm=MINHASH_PERM, seed=MINHASH_SEED)
        minhash.update_batch([s.encode() for s in shingles])
        hashed = _hashed(shingles)
        duplicate_of = None
        label = getattr(record, "label", None)
        for candidate in sorted(lsh.query(minhash)):
            if labels[candidate] == label and _jaccard(hashed, shingle_sets[candidate]) >= threshold and \
                    _jaccard(replies, reply_sets[candidate]) >= threshold:
                duplicate_of = candidate
                break
        if duplicate_of is None:
            lsh.insert(i, minhash)
            shingle_sets[i] = hashed
            reply_sets[i] = replies
            labels[i] = label
            survivors.append((i, record))
        else:
            report.near_duplicates += 1
            report.note("near_duplicates", i, f"like #{duplicate_of}: {_snippet(record)}")
    return survivors


def clean_file(source: Path, destination: Path, schema: type[Record], options: CleanOptions | None = None,
               private: bool = True, **kwargs: Any) -> CleanReport:
    """Cleans one JSON Lines file of `schema` records into another, 0600 unless `private` is False (the source may
    be a review export, students' words), as `zephyr data clean` writes it; keyword arguments go to `clean`."""
    cleaned, report = clean(list(read_jsonl(Path(source), schema)), options, **kwargs)
    write_jsonl(Path(destination), cleaned, private=private)
    return report
