"""Training data builders: public data sets and review exports as the shared record schemas (DESIGN.md §2).

- `from_hh_rlhf`: Anthropic hh-rlhf transcripts -> `PreferencePair`s (TRL conversational format).
- `from_review_export`: a `zephyr review export` file -> its format and validated records.

MCQ items from benchmark training splits (`offline.benchmarks.mcq_training_items`) are shared with quantization."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from offline.benchmarks import DatasetError
from offline.hh import hh_rows
from training.data.clean import filtered_for_training, unfit_for_training
from zephyr.prompts import with_system_prompt
from zephyr.schemas import DataFileError, KTOExample, Message, PreferencePair, SFTExample, read_jsonl

log = logging.getLogger(__name__)

HH_SOURCE = "hh-rlhf"


class BuildError(ValueError):
    """Input that cannot become training data; the message names the file or source and what to fix."""


# --- hh-rlhf -------------------------------------------------------------------------------------------------

# A turn starts at a blank line followed by the speaker. "Human:" inside a turn (no blank line before it) is text.
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class _Malformed(Exception):
    """One hh-rlhf row that is skipped; the argument is the reason, counted for the log."""


def _transcript(text: str) -> list[Message]:
    parts = _TURN.split(text)
    if parts[0].strip():
        raise _Malformed("text before the first turn")
    turns = [Message(role=_ROLES[speaker], content=content.strip())
             for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]
    if not turns or turns[-1].role != "assistant":
        raise _Malformed("no final assistant turn")
    if turns[0].role != "user":
        raise _Malformed("does not start with the user")
    # Chat templates (and the trainers' prompt/completion split) expect strictly alternating turns.
    if any(a.role == b.role for a, b in zip(turns, turns[1:], strict=False)):
        raise _Malformed("turns do not alternate")
    if turns[-1].content == "":
        raise _Malformed("empty reply")
    if any(t.content == "" for t in turns[:-1]):
        raise _Malformed("empty earlier turn")
    return turns


def _hh_pair(chosen_text: str, rejected_text: str, row: int, system_prompt: str | None) -> PreferencePair:
    chosen, rejected = _transcript(chosen_text), _transcript(rejected_text)
    if chosen[:-1] != rejected[:-1]:
        raise _Malformed("differing earlier turns")
    if chosen[-1] == rejected[-1]:
        raise _Malformed("chosen == rejected")
    prompt = with_system_prompt([turn.model_dump() for turn in chosen[:-1]], system_prompt)
    return PreferencePair(prompt=prompt, chosen=chosen[-1:], rejected=rejected[-1:], source=HH_SOURCE,
                          meta={"row": row})


def from_hh_rlhf(path: Path, limit: int | None = None,
                 system_prompt: str | None = None) -> tuple[list[PreferencePair], int]:
    """Preference pairs from Anthropic hh-rlhf transcripts (.jsonl or .jsonl.gz) and the number of rows skipped.

    The turns both transcripts share are the prompt, after `system_prompt` (the tutor's, as the service and
    rejection sampling show a chat to the model; None: none, and the chat template's own default is rendered);
    their final assistant turns are chosen and rejected.
    Rows that cannot be such a pair are skipped and counted. `limit` caps the pairs returned (reading stops
    there, so the skip count covers only the rows read). meta["row"] is the 0-based row in the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BuildError(f"{path} does not exist; pass an hh-rlhf file such as "
                         "<data_dir>/hh-rlhf-helpful-base/test.jsonl.gz")
    pairs: list[PreferencePair] = []
    reasons: Counter[str] = Counter()
    try:
        for row, number, record in hh_rows(path):
            if limit is not None and len(pairs) >= limit:
                break
            # A row without the two transcripts means the wrong file, not one bad row: stop and say so.
            if not isinstance(record, dict) or not isinstance(record.get("chosen"), str) \
                    or not isinstance(record.get("rejected"), str):
                raise BuildError(f"{path}:{number}: expected an object with string fields 'chosen' and 'rejected' "
                                 "(hh-rlhf transcripts)")
            try:
                pairs.append(_hh_pair(record["chosen"], record["rejected"], row, system_prompt))
            except _Malformed as reason:
                reasons[str(reason)] += 1
    except DatasetError as exc:
        raise BuildError(str(exc)) from exc
    skipped = sum(reasons.values())
    if skipped:
        log.info("%s: skipped %d malformed rows (%s)", path, skipped,
                 ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common()))
    if not pairs:
        raise BuildError(f"{path} holds no usable hh-rlhf pairs ({skipped} rows skipped as malformed)")
    return pairs, skipped


# --- review exports --------------------------------------------------------------------------------------------

# The keys that tell the formats apart (the schemas forbid extra keys, so a mixed file fails validation).
_EXPORT_FORMATS: dict[str, tuple[frozenset[str], type[BaseModel]]] = {
    "dpo": (frozenset({"prompt", "chosen", "rejected"}), PreferencePair),
    "kto": (frozenset({"prompt", "completion", "label"}), KTOExample),
    "sft": (frozenset({"messages"}), SFTExample),
}
_EXPORT_HINT = "write it with `zephyr review export --format dpo|kto|sft`"


def _first_record(path: Path) -> tuple[int, Any]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                try:
                    return number, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise BuildError(f"{path}:{number}: not UTF-8 text; {_EXPORT_HINT}") from None
                except json.JSONDecodeError as exc:
                    raise BuildError(f"{path}:{number}: not JSON ({exc.msg}); {_EXPORT_HINT}") from exc
    raise BuildError(f"{path} is empty; {_EXPORT_HINT}")


def from_review_export(path: Path, *, include_unfinished: bool = False,
                       left_out: Counter[str] | None = None) -> tuple[str, list[BaseModel]]:
    """The format ("dpo", "kto" or "sft") of a review export, from its first record, and every record validated
    against that format's schema, but those `unfit_for_training` (counted in `left_out` by why). A line of another
    format or none raises BuildError naming the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BuildError(f"{path} does not exist; {_EXPORT_HINT}")
    number, first = _first_record(path)
    keys = set(first) if isinstance(first, dict) else set()
    matches = [name for name, (required, _) in _EXPORT_FORMATS.items() if required <= keys]
    if len(matches) != 1:
        raise BuildError(f"{path}:{number}: not a review export record (keys: {', '.join(sorted(keys)) or 'none'}); "
                         f"expected dpo {{prompt, chosen, rejected}}, kto {{prompt, completion, label}} or sft "
                         f"{{messages}}; {_EXPORT_HINT}")
    name = matches[0]
    try:
        records = list(read_jsonl(path, _EXPORT_FORMATS[name][1]))
    except DataFileError as exc:  # already says "<file>:<line>: not a <Schema>: <why>"
        raise BuildError(f"{exc} (the file started as a {name} export: one format per file; {_EXPORT_HINT})") \
            from exc
    left_out = Counter() if left_out is None else left_out
    fit = []
    for record in records:
        if why := unfit_for_training(record.meta, allow_unfinished=include_unfinished):
            left_out[why] += 1
        else:
            fit.append(filtered_for_training(record))
    return name, fit
