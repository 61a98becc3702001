"""The service's structure: no import cycle among its modules, and an OpenAPI schema that documents the
OpenAI-compatible responses (chat completion, stream chunk, model list) as well as the requests."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from service.app import create_app
from zephyr.settings import Settings

SERVICE = Path(__file__).resolve().parents[2] / "service"


def service_imports() -> dict[str, set[str]]:
    """Module -> the service modules it imports anywhere in its text (functions and TYPE_CHECKING blocks too)."""
    modules = {}
    for path in SERVICE.rglob("*.py"):
        parts = path.relative_to(SERVICE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_service_module_imports_itself_back():
    graph = service_imports()
    assert "service.generation" in graph["service.review.candidates"]  # the walk sees the imports it should

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, set()))
    assert not cycles, f"import cycles through {cycles}"


def test_openapi_documents_the_openai_responses(tmp_path):
    spec = create_app(Settings(home=tmp_path, api_docs=True)).openapi()
    schemas = spec["components"]["schemas"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionResponse"}
    data = chat["text/event-stream"]["itemSchema"]["properties"]["data"]
    assert data["contentSchema"] == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    models = spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models == {"$ref": "#/components/schemas/ModelList"}
    refs = {ref.rsplit("/", 1)[1] for ref in _refs(spec)}
    assert refs <= schemas.keys(), refs - schemas.keys()  # every reference resolves, the chunk's included
    assert set(schemas["ChatCompletionChunk"]["required"]) == {
        "id", "object", "created", "model", "choices"}  # `usage` only in the include_usage chunk
    assert "required" not in schemas["ChatDelta"]  # role and content are left out when absent
    assert schemas["ChatCompletionResponse"]["properties"]["object"]["const"] == "chat.completion"
    json.dumps(spec)  # and it is JSON


def _refs(value):
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)
