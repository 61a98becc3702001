"""What every command shares: consoles, the one-line error that exits 1, settings and the registry."""

from __future__ import annotations

import signal
import sys

import typer
from pydantic import ValidationError
from rich.markup import escape
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from zephyr.console import make_console
from zephyr.registry import Registry
from zephyr.settings import Settings

console = make_console()
err = make_console(stderr=True, soft_wrap=True)  # errors stay on one line


def fail(message: str) -> typer.Exit:
    """`raise fail("what to fix")`: one red line on stderr, exit code 1. The message is shown as written: it quotes
    names, paths and servers' text, where "[b]" or ":train:" is no markup or emoji."""
    err.print(f"[red]error:[/] {escape(message)}", emoji=False)
    return typer.Exit(1)


def os_reason(exc: OSError) -> str:
    """An OSError as one line: why, and where ("Permission denied (/data/models/.lock)")."""
    return f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"


def os_failure(doing: str, exc: OSError) -> typer.Exit:
    """`raise os_failure("remove x", exc)`: a full disk, a read-only volume, a folder of another account, in one
    line that says what could not be done and where."""
    return fail(f"cannot {doing}: {os_reason(exc)}")


def load_settings(**overrides) -> Settings:
    """Settings from the environment; `overrides` are a command's options of the same names (`--port`)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:  # one line, each setting by the option or variable that set it
        def named(loc: tuple) -> str:
            if not loc:  # a check across settings: its message names the variables itself
                return ""
            if loc[0] in given:  # `serve --port 0` is about --port, not ZEPHYR_PORT
                return f"--{str(loc[0]).replace('_', '-')}: "
            return f"ZEPHYR_{'_'.join(str(part) for part in loc).upper()}: "

        problems = "; ".join(named(error["loc"]) + error["msg"].removeprefix("Value error, ")
                             for error in exc.errors())
        raise fail(f"bad configuration: {problems}") from None
    except ValueError as exc:
        raise fail(f"bad configuration: {exc}") from None


def registry() -> Registry:
    return Registry(load_settings().models_dir)


def unwind_on_sigterm() -> None:
    """SystemExit unwinds through the finally blocks that shut vLLM's engine processes down."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def csv(value: str | None) -> list[str] | None:
    """A comma-separated option's items, each once, in order (`arc_easy,arc_easy` scored the benchmark twice)."""
    return list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip())) if value else None


# What reaching the log's database can raise besides SQLAlchemy's own errors: asyncpg's refused connection or
# unknown host (OSError), a port that is no number (ValueError), a driver not installed (ImportError).
DATABASE_ERRORS = (SQLAlchemyError, OSError, ValueError, ImportError)


def database_failure(url: str, doing: str, exc: BaseException) -> typer.Exit:
    """One line for a database command that failed: where (no user, password or query string), what, and why."""
    try:
        parsed = make_url(url)
        where = (f"{parsed.drivername}://{parsed.host or ''}{f':{parsed.port}' if parsed.port else ''}"
                 f"/{parsed.database or ''}")
    except Exception:  # a URL SQLAlchemy cannot parse: say nothing of it that could hold a secret
        where = "ZEPHYR_DB_URL"
    detail = str(exc).splitlines()[0][:200] if isinstance(exc, OSError | ValueError | ImportError) else ""
    return fail(f"cannot {doing} in {where}: {exc.__class__.__name__}{f' ({detail})' if detail else ''}; is "
                "ZEPHYR_DB_URL right, and has the server (which migrates the schema) run against it?")
