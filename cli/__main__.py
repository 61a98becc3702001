"""`python -m cli ...` is `zephyr ...` (tests and the load-test harness start the server this way)."""

from cli.app import app

app(prog_name="zephyr")
