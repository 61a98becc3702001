import io

from rich.table import Table

from zephyr.console import LOG_WIDTH, make_console

NAME = "smollm2-135m-instruct-w8a8-s05"


def _table() -> Table:
    table = Table()
    for column in ("model", "RSS peak", "tok/s c=1", "x parent", "p50 latency c=1", "tok/s c=8", "x parent",
                   "p50 latency c=8", "tok/s c=32", "x parent", "p50 latency c=32"):
        table.add_column(column)
    table.add_row(NAME, "3.96 GiB", "25.2", "1.01x", "2.60 s", "171.5", "1.54x", "2.97 s", "282.6", "1.65x", "7.21 s")
    return table


def test_tables_written_to_a_log_keep_every_name_and_figure(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    console = make_console(file=out)
    assert console.width == LOG_WIDTH
    console.print(_table())
    assert NAME in out.getvalue() and "1.65x" in out.getvalue() and "…" not in out.getvalue()


def test_columns_and_an_explicit_width_still_win(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console(file=io.StringIO()).width == 100
    monkeypatch.delenv("COLUMNS")
    assert make_console(file=io.StringIO(), width=60).width == 60


def test_plain_rich_cuts_the_same_table_so_the_check_above_can_fail(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    from rich.console import Console

    out = io.StringIO()
    Console(file=out).print(_table())
    assert NAME not in out.getvalue()
