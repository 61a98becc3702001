"""The import graph of Zephyr's packages, read from the source with `ast` (imports inside functions count too).

    python scripts/import_graph.py          # a table of package -> package arrows, then the verdict
    python scripts/import_graph.py --dot    # Graphviz, e.g. | dot -Tsvg > imports.svg

The rule (DESIGN.md §1): the core (zephyr/) imports no other package; service/ imports only the core; offline/
(what the offline packages share) imports only the core; training/, quant/ and evals/ import the core, offline/
and themselves, never each other; cli/ wires everything and nothing imports it. Exits 1 on a forbidden arrow or
a cycle. CI enforces the same rule with import-linter (`lint-imports`, contracts in pyproject.toml)."""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zephyr", "service", "offline", "training", "quant", "evals", "cli")
ALLOWED = {
    "zephyr": set(),
    "service": {"zephyr"},
    "offline": {"zephyr"},
    "training": {"zephyr", "offline"},
    "quant": {"zephyr", "offline"},
    "evals": {"zephyr", "offline"},
    "cli": {"zephyr", "service", "offline", "training", "quant", "evals"},
}


def imported_packages(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [name.split(".")[0] for name in names if name.split(".")[0] in PACKAGES]


def arrows() -> Counter:
    found: Counter = Counter()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target in imported_packages(path):
                if target != package:
                    found[(package, target)] += 1
    return found


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    graph = {p: sorted(t for s, t in edges if s == p) for p in PACKAGES}
    found, path, on_path, done = [], [], set(), set()

    def visit(node: str) -> None:
        path.append(node)
        on_path.add(node)
        for nxt in graph[node]:
            if nxt in on_path:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt)
        on_path.discard(path.pop())
        done.add(node)

    for node in PACKAGES:
        if node not in done:
            visit(node)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dot", action="store_true", help="print Graphviz DOT instead of a table")
    args = parser.parse_args(argv)
    found = arrows()
    forbidden = sorted(edge for edge in found if edge[1] not in ALLOWED[edge[0]])
    loops = cycles(set(found))
    if args.dot:
        print("digraph imports {\n  rankdir=BT;")
        for (source, target), count in sorted(found.items()):
            colour = ' color="red"' if (source, target) in forbidden else ""
            print(f'  "{source}" -> "{target}" [label="{count}"{colour}];')
        print("}")
    else:
        width = max(len(p) for p in PACKAGES)
        print(f"{'from':<{width}}  {'to':<{width}}  imports")
        for (source, target), count in sorted(found.items()):
            mark = "  FORBIDDEN" if (source, target) in forbidden else ""
            print(f"{source:<{width}}  {target:<{width}}  {count:>7}{mark}")
        for loop in loops:
            print("cycle: " + " -> ".join(loop))
        print("ok: one-way imports, no cycle" if not forbidden and not loops else
              f"{len(forbidden)} forbidden arrows, {len(loops)} cycles")
    return 1 if forbidden or loops else 0


if __name__ == "__main__":
    sys.exit(main())
