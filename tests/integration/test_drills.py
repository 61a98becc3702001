"""The soak run and the fault drills in their short forms, each on a server of its own, under Locust load.
The long forms (`make soak`, `make drills`) run the same code for longer and with more users."""

from __future__ import annotations

import pytest
from rich.console import Console

from loadtest import drills, soak
from loadtest.harness import Report

pytestmark = pytest.mark.integration
SHORT = drills.SHORT


def assert_passed(report: Report) -> None:
    console = Console(width=140, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(report.table())
    assert report.passed, console.export_text()


def test_soak_short(tmp_path):
    assert_passed(soak.run(minutes=1, users=16, out=tmp_path, exam_period=20))


def test_sigterm_drains_under_load(tmp_path):
    assert_passed(drills.sigterm(SHORT.load_s, SHORT.users, tmp_path))


def test_killed_engine_under_load(tmp_path):
    assert_passed(drills.engine_kill(SHORT.load_s, SHORT.users, tmp_path))


def test_hung_engine_under_load(tmp_path):
    assert_passed(drills.engine_hang(SHORT.load_s, SHORT.users, tmp_path))


def test_postgres_outage_under_load(tmp_path):
    assert_passed(drills.postgres(SHORT.load_s, SHORT.outage_s, SHORT.users, tmp_path))
