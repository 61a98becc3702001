from __future__ import annotations

import asyncio

import httpx
import pytest
from asgi_lifespan import LifespanManager

from loadtest.harness import linked_variant
from service.app import create_app
from tests.unit.stub_engine import StubEngine
from zephyr.settings import DEFAULT_MODEL, Settings

STUDENT_KEY = "student-key-12345"
REVIEWER_KEY = "reviewer-key-456"
ADMIN_KEY = "admin-key-7890123"


@pytest.fixture
def settings_factory(tmp_path, default_model):
    home = tmp_path / "home"
    linked_variant(home, default_model, DEFAULT_MODEL, mcq_calibration=None)

    def make(**overrides) -> Settings:
        values = dict(
            # The default model without the shared registry's MCQ calibration record, whatever it holds.
            home=home,
            api_keys=f"student:{STUDENT_KEY},reviewer:{REVIEWER_KEY},admin:{ADMIN_KEY}",
            log_flush_seconds=0.01,
            log_retry_seconds=0.05,
            # No random review sampling: a candidate would add engine calls and log rows at random.
            review_share=0.0,
            # The safety guard loads an encoder (a second, 120 MB): tested where it is asserted (test_safety.py).
            safety_guard=False,
        )
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def app_factory(settings_factory, tokenizer):
    """Builds a running app over the stub engine: `async with app_factory(**settings) as (client, app):`"""

    class Running:
        def __init__(self, **overrides):
            self.settings = settings_factory(**overrides)
            self.factory = StubEngine.factory(tokenizer)

        async def __aenter__(self):
            self.fatal_calls = 0
            self.fatal = asyncio.Event()

            def on_fatal() -> None:
                self.fatal_calls += 1
                self.fatal.set()

            self.app = create_app(self.settings, self.factory, on_fatal=on_fatal)
            # asgi-lifespan's 5 s default: an app start took longer than that with the unit tests on
            # both cores, and a slow start is not what these tests assert.
            self.manager = LifespanManager(self.app, startup_timeout=60, shutdown_timeout=60)
            await self.manager.__aenter__()
            await self.app.state.ready.wait()
            transport = httpx.ASGITransport(app=self.manager.app)
            self.client = httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {STUDENT_KEY}"}
            )
            self.engine: StubEngine = self.factory.last
            return self

        async def __aexit__(self, *exc):
            await self.client.aclose()
            await self.manager.__aexit__(*exc)

        async def restart_asked(self, seconds: float = 5.0) -> bool:
            """Whether the app asked for a restart (on_fatal) within `seconds`: its watchdog looks once a second."""
            try:
                await asyncio.wait_for(self.fatal.wait(), seconds)
            except TimeoutError:
                return False
            return True

        async def flushed_log(self):
            log = self.app.state.generation_log
            await log.flush()
            return log

    return Running


@pytest.fixture
async def served(app_factory):
    async with app_factory() as running:
        yield running


@pytest.fixture
def refused_tool_output(tmp_path, monkeypatch):
    """Runs a `python -m tools.NAME` entry point with no data and no models, so a mistake must be refused from the
    arguments alone; returns its output on one line once it has exited with a usage error (2)."""

    def run(main, args: list[str]) -> str:
        import typer
        from typer.testing import CliRunner

        monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "no-data"))
        monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "no-home"))
        app = typer.Typer()
        app.command()(main)
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())

    return run
