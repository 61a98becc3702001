"""Extracts the component schemas our conformance tests need from OpenAI's published OpenAPI document into
schemas.json beside this script (MIT, LICENSE beside it too). Run from the repository root:

    python tests/openai_openapi/extract.py ../shared/openai-openapi/openapi.json

It copies the named response schemas and every component they reference, unchanged except that references
move from `#/components/schemas/X` to `#/$defs/X`, so that the file is one JSON Schema 2020-12 document. Where
the document is stricter than OpenAI's real responses, the tests say so and relax it there (never here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "ErrorResponse")
SOURCE = "openai/openai-openapi, commit f85dbe2 (openapi.json)"
PREFIX = "#/components/schemas/"


def refs(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {value["$ref"].removeprefix(PREFIX)} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(refs(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(refs(item) for item in value))
    return set()


def moved(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: item.replace(PREFIX, "#/$defs/") if key == "$ref" else moved(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [moved(item) for item in value]
    return value


def extract(document: dict[str, Any]) -> dict[str, Any]:
    components = document["components"]["schemas"]
    wanted, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(refs(components[name]) - wanted)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"Extracted from {SOURCE} by tests/openai_openapi/extract.py; MIT, see LICENSE.",
            "$defs": {name: moved(components[name]) for name in sorted(wanted)}}


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/openai-openapi/openapi.json")
    out = Path(__file__).with_name("schemas.json")
    out.write_text(json.dumps(extract(json.loads(source.read_text())), indent=1, ensure_ascii=False) + "\n")
    print(f"{out}: {len(json.loads(out.read_text())['$defs'])} schemas")
