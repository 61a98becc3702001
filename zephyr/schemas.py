"""Data file schemas shared by every part (DESIGN.md §2). Each file is JSON Lines, one record a line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zephyr.mcq import LETTERS, MAX_OPTIONS, MIN_OPTIONS
from zephyr.paths import writing_atomically


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class MCQItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    question: str
    options: list[str] = Field(min_length=MIN_OPTIONS, max_length=MAX_OPTIONS)
    answer: str
    subject: str | None = None
    support: str | None = None

    @model_validator(mode="after")
    def _answer_is_an_option_letter(self) -> MCQItem:
        if self.answer not in tuple(LETTERS[: len(self.options)]):  # one letter: "" and "AB" are substrings
            raise ValueError(f"answer {self.answer!r} is not one of the option letters")
        return self


class PreferencePair(BaseModel):
    """TRL conversational preference format: prompt messages, then one chosen and one rejected reply."""

    model_config = ConfigDict(extra="forbid")
    prompt: list[Message] = Field(min_length=1)
    chosen: list[Message] = Field(min_length=1)
    rejected: list[Message] = Field(min_length=1)
    source: str
    meta: dict[str, Any] = {}


class TextPreferencePair(BaseModel):
    """TRL's standard (plain-text) preference format, with no chat template: `prompt + chosen` is the exact text
    scored. Cloze-form pairs (training/data/cloze.py) use it: prompt = mcq.cloze_context, chosen/rejected =
    mcq.cloze_continuation of the key and of a distractor. Training tokenizes it with mcq.cloze_split and adds no
    special token and no EOS, so the ids trained on are the ids /mcq's cloze scores."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    source: str
    meta: dict[str, Any] = {}


class TextSFTExample(BaseModel):
    """TRL's standard (plain-text) prompt-completion format: the loss is on `completion` only, tokenized like a
    TextPreferencePair's replies (mcq.cloze_split, no special tokens, no EOS)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)
    meta: dict[str, Any] = {}


class SFTExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=2)
    meta: dict[str, Any] = {}  # provenance (e.g. review item ids); trainers ignore it


class KTOExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: list[Message] = Field(min_length=1)
    completion: list[Message] = Field(min_length=1)
    label: bool
    meta: dict[str, Any] = {}


class VerifiablePrompt(BaseModel):
    """An online-RL prompt whose answers are checked, not judged (GRPO): the conversation up to the tutor's turn, and
    the key's letter among the question's option `letters`."""

    model_config = ConfigDict(extra="forbid")
    prompt: list[Message] = Field(min_length=1)
    answer: str = Field(min_length=1, max_length=1)
    letters: str = Field(min_length=MIN_OPTIONS, max_length=MAX_OPTIONS)
    source: str
    meta: dict[str, Any] = {}

    @model_validator(mode="after")
    def _answer_is_one_of_the_letters(self) -> VerifiablePrompt:
        if self.letters != LETTERS[: len(self.letters)]:
            raise ValueError(f"letters must be {LETTERS[:len(self.letters)]!r} (the first options' letters in order)")
        if self.answer not in self.letters:
            raise ValueError(f"answer {self.answer!r} is not one of the letters {self.letters!r}")
        return self


Record = TypeVar("Record", bound=BaseModel)


class DataFileError(ValueError):
    pass


def read_jsonl(path: Path, schema: type[Record]) -> Iterator[Record]:
    """Records of `schema`; a bad line raises DataFileError naming the file and line."""
    with Path(path).open("rb") as handle:  # decoded line by line: an error names the line it is on
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataFileError(f"{path}:{number}: not UTF-8 text; a JSON Lines file of {schema.__name__} "
                                    "records is expected") from None
            if not line.strip():
                continue
            try:
                yield schema.model_validate_json(line)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(map(str, error["loc"]))  # which field: "Field required" alone named none
                bom = " (the file starts with a byte-order mark: save it as UTF-8 without one)" \
                    if number == 1 and line.startswith("\ufeff") else ""
                raise DataFileError(f"{path}:{number}: not a {schema.__name__}: "
                                    f"{f'{where}: ' if where else ''}{error['msg']}{bom}") from exc


def write_jsonl(path: Path, records: Iterable[BaseModel], *, private: bool = False) -> int:
    """Written whole or not at all (`writing_atomically`); `private`: made 0600 (it holds students' words: data
    made from review exports)."""
    count = 0
    with writing_atomically(path, private=private) as handle:
        for record in records:
            handle.write(json.dumps(record.model_dump(exclude_none=True), ensure_ascii=False) + "\n")
            count += 1
    return count
