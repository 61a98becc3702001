"""The install's session secret: replicas starting together on one volume agree on one, and none reads it half
written (it keys every API-key digest in the log and signs the review page's cookies)."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

from service.auth import SECRET_FILE, install_secret


def _install(home: str) -> bytes:
    return install_secret(Path(home), None)


def test_replicas_starting_together_agree_on_one_whole_secret(tmp_path):
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        secrets = pool.map(_install, [str(tmp_path)] * 24)
    assert len(set(secrets)) == 1 and len(secrets[0]) == 64
    path = next(tmp_path.rglob(SECRET_FILE))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no draft left behind


def test_a_configured_secret_wins_and_a_readable_file_is_made_private(tmp_path):
    assert install_secret(tmp_path, "s" * 40) == b"s" * 40
    first = install_secret(tmp_path, None)
    path = next(tmp_path.rglob(SECRET_FILE))
    os.chmod(path, 0o644)
    assert install_secret(tmp_path, None) == first and stat.S_IMODE(path.stat().st_mode) == 0o600



def test_an_existing_secret_is_read_without_writing_beside_it(tmp_path, monkeypatch):
    """A pre-provisioned secret on a read-only mount: read as it is; a draft written beside it would fail there."""
    import service.auth

    first = install_secret(tmp_path, None)

    def read_only(*_args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(service.auth, "_publish_secret", read_only)
    assert install_secret(tmp_path, None) == first
