"""Anthropic hh-rlhf transcripts (JSON Lines, gzipped or not), read line by line: what `zephyr data hh` builds
preference pairs from and `zephyr eval safety` takes everyday first turns from."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from offline.benchmarks import DatasetError

FORM = '{"chosen": "\\n\\nHuman: ...", "rejected": ...}'


def _open_text(path: Path):
    # Sniff the gzip magic rather than trust the suffix: people gunzip files and keep the name, or the reverse.
    with path.open("rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else path.open(encoding="utf-8")


def hh_rows(path: Path) -> Iterator[tuple[int, int, Any]]:
    """(row index, line number, parsed JSON) for each non-blank line; a file that cannot be read, or a line that is
    not JSON, is a DatasetError naming it."""
    row = 0
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{number}: not JSON ({exc.msg}); expected hh-rlhf JSON Lines "
                                       f"{FORM}") from exc
                yield row, number, record
                row += 1
    # BadGzipFile is an OSError; a stream corrupt part way is zlib's own error
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise DatasetError(f"cannot read {path} as hh-rlhf JSON Lines (.jsonl or .jsonl.gz): {exc}") from exc
