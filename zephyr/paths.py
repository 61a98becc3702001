"""Private folders and files: what Zephyr keeps about students (the generation log's SQLite file and its
spill files) is readable by the account that runs it and by no one else, whatever the umask.

Folders Zephyr creates are made 0700, and so is an existing folder it keeps such data in ($ZEPHYR_HOME by
default) when the account owns it; a folder it does not own, a shared sticky folder such as /tmp, and the
account's home directory are left as they are (with a warning). Files are created 0600 and tightened to 0600
when they already exist. The modes are set with chmod after creation, so the umask cannot loosen them."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

log = logging.getLogger("zephyr.paths")
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def _owned(path: Path) -> bool:
    getuid = getattr(os, "getuid", None)
    return getuid is None or path.stat().st_uid == getuid()


def private_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and any missing parents) 0700, or tighten it to 0700 if it exists and is ours to tighten."""
    path = Path(path).expanduser()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for created in missing:
        os.chmod(created, PRIVATE_DIR_MODE)
    if path in missing:
        return path
    mode = path.stat().st_mode
    if stat.S_IMODE(mode) & 0o077 == 0:
        return path
    if mode & stat.S_ISVTX or not _owned(path) or path.resolve() == Path.home().resolve():
        log.warning("%s is readable by other accounts and is not Zephyr's to tighten; keep the generation log "
                    "in a folder of its own (ZEPHYR_HOME, ZEPHYR_DB_URL, ZEPHYR_SPILL_PATH)", path)
        return path
    try:
        os.chmod(path, PRIVATE_DIR_MODE)
    except OSError as exc:  # a read-only mount, say
        log.warning("cannot make %s private (0700): %s", path, exc)
    return path


def private_file(path: str | os.PathLike) -> bool:
    """Tighten an existing file to 0600; False if there is none (or it is not ours: left alone, with a warning)."""
    path = Path(path)
    try:
        if stat.S_IMODE(path.stat().st_mode) == PRIVATE_FILE_MODE:
            return True
        os.chmod(path, PRIVATE_FILE_MODE)
    except FileNotFoundError:
        return False
    except OSError as exc:  # another account's file, a read-only mount
        log.warning("cannot make %s private (0600): %s", path, exc)
        return False
    return True


def create_private_file(path: str | os.PathLike) -> None:
    """Create an empty file 0600 unless it exists (then only tightened): before another program (SQLite) makes
    it with the umask's mode."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        private_file(path)
        return
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


def open_private_append(path: str | os.PathLike):
    """Open a text file for appending, created 0600 (an existing file is tightened to 0600 too)."""
    return _open_private(path, os.O_APPEND, "a")


def _open_private(path: str | os.PathLike, flag: int, mode: str):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError as exc:  # another account's file that we may write but not chmod
        log.warning("cannot make %s private (0600): %s", path, exc)
    return os.fdopen(fd, mode, encoding="utf-8")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite SQLAlchemy URL; None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[-1].split("?", 1)[0]
    if not path or path == ":memory:" or path == url:
        return None
    return Path(path)


def private_sqlite_files(database: Path) -> None:
    """Tighten a SQLite database and the journal files beside it to 0600."""
    for path in (database, *(database.with_name(database.name + suffix) for suffix in SQLITE_SIDECARS)):
        private_file(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, private: bool = False) -> None:
    """Replace `path`'s content all at once (`writing_atomically`)."""
    with writing_atomically(path, private=private) as handle:
        handle.write(text)


def written_as_a_stream(path: Path) -> bool:
    """Whether `writing_atomically` writes `path` as it is (appending) rather than beside it and renamed in: a
    device, a pipe or a descriptor (/dev/stdout, /proc/self/fd/1), which has no folder to write beside it in."""
    if path.is_absolute() and path.parts[1:2] in (("dev",), ("proc",)):
        return True
    try:
        return not stat.S_ISREG(path.stat().st_mode)
    except OSError:  # not there (or under a file): a new file, written beside and renamed in
        return False


def check_writable(path: str | os.PathLike) -> None:
    """Before long work whose result `writing_atomically` will write to `path` (as the user gave it, `~`
    expanded): its folder made, and able to take the new file (written beside, renamed in), or an OSError naming
    what is not writable. Making the folder is no test: `mkdir` of a folder that exists succeeds on a read-only
    mount and in another account's folder."""
    given = Path(path)
    if given.exists() and written_as_a_stream(given):  # /dev/stdout, a pipe: written as it is
        if stat.S_ISSOCK(given.stat().st_mode):  # stdout under systemd's journal: no name opens it
            raise OSError(errno.ENXIO, "a socket cannot be opened by its name; write to a file or a pipe", str(given))
        if not os.access(given, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable here", str(given))
        return
    folder = Path(os.path.realpath(given)).parent
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "its folder is not writable here", str(folder))


@contextlib.contextmanager
def writing_atomically(path: str | os.PathLike, *, private: bool = False) -> Iterator[TextIO]:
    """A text file that replaces `path` all at once when the block ends: written beside it, synced, then renamed
    over it, so a full disk or a kill part way leaves the old file whole (never a truncated manifest, result, or a
    review export that would go on to count fewer verdicts without a word). `private`: made 0600, for what holds
    students' words outside the database (review exports and the training data made from them)."""
    given = Path(path)
    try:
        existing = given.stat()
    except FileNotFoundError:
        existing = None
    if written_as_a_stream(given):
        # /dev/stdout, a pipe, a descriptor: written as it is, appended to (a shell's `>>` log keeps what it holds;
        # `>` emptied it already), its mode left alone
        with open(given, "a", encoding="utf-8") as handle:
            yield handle
        return
    path = Path(os.path.realpath(given))  # through a link, to the file it names: the link stays a link
    # A name of its own: two writers of one file (an eval run beside a calibration) must not remove each other's.
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE if private else 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if existing is not None and not private:  # a file someone shared or tightened keeps its mode
                os.fchmod(handle.fileno(), stat.S_IMODE(existing.st_mode))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def clear_asides(folder: Path, name: str, why: str) -> None:
    """Retry deleting the folders `fresh_aside` named for `name` in `folder` that an earlier stop or a held-open file
    (NFS keeps a deleted file's `.nfs*` while a server reads it) left half deleted; left if still held."""
    earlier = re.compile(rf"\.{re.escape(name)}\.{why}(-\d+)?")  # this name's own, not a longer name's
    for left in folder.glob(f".{name}.{why}*"):
        if earlier.fullmatch(left.name):
            shutil.rmtree(left, ignore_errors=True)


def fresh_aside(folder: Path, name: str, why: str) -> Path:
    """A hidden name in `folder` no earlier aside holds (`.NAME.WHY-<ns>`), once those are retried
    (`clear_asides`), for `name`'s folder on its way out (replaced, removed): under one fixed name, a half-deleted
    one made the rename fail after a training or quantization run had done its work."""
    clear_asides(folder, name, why)
    return folder / f".{name}.{why}-{time.time_ns()}"
