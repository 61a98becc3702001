"""Docs review fixes that tests keep fixed: bracketed text in `--help` (Rich markup took `[env ...]` and
`[default: ...]` for style tags and dropped them), `zephyr chat` leaving the sampling to the server's chat defaults
unless --temperature is given, and `make load --url` sending the user's keys to a remote server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from cli import app as cli_app

runner = CliRunner()


def _help(*command: str) -> str:
    """`zephyr COMMAND --help` on a wide terminal, the table's borders and line breaks flattened to spaces."""
    result = runner.invoke(cli_app.app, [*command, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(("command", "shown"), [
    (("serve",), ["Address to bind [env ZEPHYR_HOST, default 127.0.0.1]", "Port [env ZEPHYR_PORT, default 8000]",
                  "Registry model [env ZEPHYR_MODEL]"]),
    (("quantize",), ["Registry name of the result [default: MODEL-METHOD]",
                     "[default: tutoring chats built from the training splits of --calibration-sources]",
                     "[default: on with --smoothing > 0]"]),
    (("data", "hh"), ["[default: $ZEPHYR_DATA_DIR/hh-rlhf-helpful-base/test.jsonl.gz]"]),
])
def test_bracketed_help_text_is_shown(command, shown):
    text = _help(*command)
    for part in shown:
        assert part in text, f"{part!r} missing from `zephyr {' '.join(command)} --help`:\n{text}"


class _FakeClient:
    """The OpenAI client `zephyr chat` talks through: one model, and a one-chunk stream per question."""

    def __init__(self):
        self.requests: list[dict] = []
        self.models = SimpleNamespace(list=lambda: SimpleNamespace(data=[SimpleNamespace(id="tutor")]))
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **request):
        self.requests.append({**request, "messages": list(request["messages"])})  # as sent, not as it grows later
        delta = SimpleNamespace(content="Plants make sugar.")
        return iter([SimpleNamespace(choices=[SimpleNamespace(delta=delta)])])


@pytest.mark.parametrize(("args", "sent"), [
    ([], None),  # the server's own chat defaults (ZEPHYR_CHAT_TEMPERATURE / ZEPHYR_CHAT_TOP_P) then apply
    (["--temperature", "0.7"], 0.7),
    (["--temperature", "0"], 0.0),
])
def test_chat_sends_a_temperature_only_when_given(monkeypatch, args, sent):
    client = _FakeClient()
    monkeypatch.setattr(cli_app, "_client", lambda url, api_key: client)
    result = runner.invoke(cli_app.app, ["chat", *args], input="What is photosynthesis?\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "Plants make sugar." in result.output
    [request] = client.requests
    if sent is None:
        assert "temperature" not in request and "top_p" not in request
    else:
        assert request["temperature"] == sent


def _locust_env(monkeypatch, tmp_path, url: str) -> dict[str, str]:
    """The environment Locust.start hands its subprocess, with the subprocess itself stubbed out."""
    from loadtest import harness

    seen: dict[str, str] = {}

    class FakePopen:
        def __init__(self, command, env, **kwargs):
            seen.update(env)

    monkeypatch.setattr(harness.subprocess, "Popen", FakePopen)
    harness.Locust.start(url, tmp_path / "out", users=1, seconds=1)
    return seen


def test_locust_uses_the_users_keys_for_a_remote_server(monkeypatch, tmp_path):
    # docs/operations.md: `ZEPHYR_LOAD_STUDENT_KEY=... ZEPHYR_LOAD_REVIEWER_KEYS=k1,k2 make load --url ...`
    monkeypatch.setenv("ZEPHYR_LOAD_STUDENT_KEY", "remote-student-key-0001")
    monkeypatch.setenv("ZEPHYR_LOAD_REVIEWER_KEYS", "remote-reviewer-a-0001,remote-reviewer-b-0001")
    env = _locust_env(monkeypatch, tmp_path, "https://tutor.example.org")
    assert env["ZEPHYR_LOAD_STUDENT_KEY"] == "remote-student-key-0001"
    assert env["ZEPHYR_LOAD_REVIEWER_KEYS"] == "remote-reviewer-a-0001,remote-reviewer-b-0001"


def test_locust_uses_the_load_keys_for_a_server_the_harness_started(monkeypatch, tmp_path):
    from loadtest import harness

    # The local server is given the load keys (LocalServer.start), so the user's keys must not reach Locust.
    monkeypatch.setenv("ZEPHYR_LOAD_STUDENT_KEY", "remote-student-key-0001")
    monkeypatch.setenv("ZEPHYR_LOAD_REVIEWER_KEYS", "remote-reviewer-a-0001")
    monkeypatch.setattr(harness, "_LOCAL_URLS", {"http://127.0.0.1:23456"})
    env = _locust_env(monkeypatch, tmp_path, "http://127.0.0.1:23456")
    assert env["ZEPHYR_LOAD_STUDENT_KEY"] == harness.STUDENT_KEY
    assert env["ZEPHYR_LOAD_REVIEWER_KEYS"] == ",".join(harness.REVIEWER_KEYS)


def test_locust_falls_back_to_the_load_keys_where_none_are_set(monkeypatch, tmp_path):
    from loadtest import harness

    monkeypatch.delenv("ZEPHYR_LOAD_STUDENT_KEY", raising=False)
    monkeypatch.delenv("ZEPHYR_LOAD_REVIEWER_KEYS", raising=False)
    env = _locust_env(monkeypatch, tmp_path, "https://tutor.example.org")
    assert env["ZEPHYR_LOAD_STUDENT_KEY"] == harness.STUDENT_KEY
    assert env["ZEPHYR_LOAD_REVIEWER_KEYS"] == ",".join(harness.REVIEWER_KEYS)


def test_a_started_server_counts_as_local_until_stopped(monkeypatch, tmp_path):
    from loadtest import harness

    class Exited:
        returncode = 0

        def __init__(self, *args, **kwargs):
            pass

        def poll(self):
            return 0

    monkeypatch.setattr(harness, "_LOCAL_URLS", set())
    monkeypatch.setattr(harness.subprocess, "Popen", Exited)
    monkeypatch.setattr(harness, "wait_ready", lambda *args: 0.0)
    server = harness.LocalServer.start(tmp_path)
    assert harness.load_keys(server.url)["ZEPHYR_LOAD_STUDENT_KEY"] == harness.STUDENT_KEY
    server.stop()
    assert harness._LOCAL_URLS == set()


def test_a_comma_separated_option_names_each_item_once():
    from cli.common import csv

    assert csv("arc_easy, sciq,arc_easy,,") == ["arc_easy", "sciq"] and csv("") is None


def test_the_load_summary_counts_answers_over_the_span_they_ran_and_shows_failed_latency():
    """`make load`'s rate counted failed requests as throughput over a clock that included Locust's start-up and
    its wait for the last users; the latency columns hid requests that timed out."""
    from rich.console import Console

    from loadtest.load import summary

    events = [{"name": "chat", "start": 100.0, "end": 110.0, "status": 200, "error": None, "first_token": 101.5},
              {"name": "chat", "start": 105.0, "end": 165.0, "status": 0, "error": "ReadTimeout", "first_token": None},
              {"name": "chat", "start": 120.0, "end": 130.0, "status": 200, "error": None, "first_token": 121.0},
              {"name": "mcq", "start": 101.0, "end": 102.0, "status": 500, "error": None}]
    console = Console(width=250, record=True)
    console.print(summary(events, "t"))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in console.export_text().splitlines() if line.startswith("│")}
    # count, ok, 4xx, 5xx, no response, p50, p95, failed p50, first token p50, ok per min (2 answers in 65 s)
    assert rows["chat"] == ["3", "2", "0", "0", "1", "10.00", "10.00", "60.00", "1.00", "2"]
    assert rows["mcq"] == ["1", "0", "0", "1", "0", "-", "-", "1.00", "-", "0"]


def test_the_bench_shows_no_p99_where_it_would_be_the_slowest_request():
    """At concurrency 1 the default run times 16 requests: its "p99" was their maximum, and the ratio row divided
    one server's slowest request by the other's."""
    from rich.console import Console

    from loadtest.bench import P99_MIN_REQUESTS, Level, ratio_table

    def level(target: str, conc: int, n: int) -> Level:
        return Level(target, conc, n, 10.0, 100 * n, ttft_s=[0.1] * n, latency_s=[1.0] * (n - 1) + [9.0])

    few, many = 16, P99_MIN_REQUESTS
    console = Console(width=250, record=True)
    console.print(ratio_table("t", [level(t, 1, few) for t in ("zephyr", "vllm")]
                              + [level(t, 8, many) for t in ("zephyr", "vllm")]))
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in console.export_text().splitlines()
            if line.startswith("│")]
    # concurrency, target, n, tok/s, p50 TTFT, p99 TTFT, p50 e2e, p99 e2e, errors
    assert rows[0][1:] == ["zephyr", "16", "160.0", "100", "-", "1.00", "-", "0"]
    assert rows[2][5] == "-" and rows[2][7] == "-"  # the ratio row: no tail to compare
    assert rows[3][1:] == ["zephyr", "100", "1000.0", "100", "100", "1.00", "1.00", "0"]


class _FailingOnceClient(_FakeClient):
    """A server that refuses the first question with `error` (an openai exception) and answers the rest."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def _create(self, **request):
        if self.error is not None:
            self.requests.append({**request, "messages": list(request["messages"])})
            error, self.error = self.error, None
            raise error
        return super()._create(**request)


def _status_error(status: int, code: str, message: str):
    import httpx
    import openai

    request = httpx.Request("POST", "http://tutor/v1/chat/completions")
    body = {"error": {"message": message, "type": "invalid_request_error", "param": "max_tokens", "code": code}}
    response = httpx.Response(status, json=body, request=request)
    kind = {400: openai.BadRequestError, 429: openai.RateLimitError}[status]
    return kind(message, response=response, body=body["error"])


@pytest.mark.parametrize(("status", "code", "hint"), [
    (400, "context_length_exceeded", "/new starts a new conversation"),
    (429, "rate_limited", ""),
])
def test_chat_goes_on_after_a_refused_turn(monkeypatch, status, code, hint):
    client = _FailingOnceClient(_status_error(status, code, "the prompt is 1900 tokens [and more]"))
    monkeypatch.setattr(cli_app, "_client", lambda url, api_key: client)
    result = runner.invoke(cli_app.app, ["chat"], input="first question\nsecond question\n/quit\n")
    assert result.exit_code == 0, result.output
    assert f"{status}: the prompt is 1900 tokens [and more]" in result.output  # the server's words, brackets kept
    assert hint in result.output
    assert "Plants make sugar." in result.output
    # the refused question is taken back: the next turn does not carry it
    assert client.requests[1]["messages"] == [{"role": "user", "content": "second question"}]


def test_chat_new_starts_a_new_conversation(monkeypatch):
    client = _FakeClient()
    monkeypatch.setattr(cli_app, "_client", lambda url, api_key: client)
    result = runner.invoke(cli_app.app, ["chat"], input="one\n/new\ntwo\n/quit\n")
    assert result.exit_code == 0, result.output
    assert client.requests[0]["messages"] == [{"role": "user", "content": "one"}]
    assert client.requests[1]["messages"] == [{"role": "user", "content": "two"}]


def test_chat_stops_one_answer_on_ctrl_c_and_keeps_what_was_shown(monkeypatch):
    client = _FakeClient()
    closed = []

    class Interrupted:
        def __iter__(self):
            yield SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content="Plants"))])
            raise KeyboardInterrupt

        def close(self):
            closed.append(True)

    def create(**request):
        client.requests.append({**request, "messages": list(request["messages"])})
        return Interrupted() if len(client.requests) == 1 else iter([])

    client.chat = SimpleNamespace(completions=SimpleNamespace(create=create))
    monkeypatch.setattr(cli_app, "_client", lambda url, api_key: client)
    result = runner.invoke(cli_app.app, ["chat"], input="one\ntwo\n/quit\n")
    assert result.exit_code == 0, result.output
    assert closed == [True] and "(stopped)" in result.output
    assert client.requests[1]["messages"][:2] == [{"role": "user", "content": "one"},
                                                  {"role": "assistant", "content": "Plants"}]


def test_chat_goes_on_after_ctrl_c_while_waiting_and_after_a_connection_lost_mid_answer(monkeypatch):
    """The server sends its headers with the first event, so the wait through the queue and the prefill is inside
    `create`: Ctrl-C there ended the session. A connection dropped part way ("cannot reach ...") did too."""
    import httpx
    import openai

    client = _FakeClient()

    class Dropped:
        def __iter__(self):
            yield SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content="Plants"))])
            raise openai.APIConnectionError(request=httpx.Request("POST", "http://tutor/v1/chat/completions"))

        def close(self):
            pass

    class ConnectError(Exception):  # what the client's transport raises when no connection is made
        pass

    def create(**request):
        client.requests.append({**request, "messages": list(request["messages"])})
        if len(client.requests) == 1:
            raise KeyboardInterrupt
        if len(client.requests) == 4:  # the server went away: the session ends, in one line
            raise openai.APIConnectionError(request=httpx.Request("POST", "http://tutor")) from ConnectError()
        return Dropped() if len(client.requests) == 2 else iter([])

    client.chat = SimpleNamespace(completions=SimpleNamespace(create=create))
    monkeypatch.setattr(cli_app, "_client", lambda url, api_key: client)
    result = runner.invoke(cli_app.app, ["chat"], input="one\ntwo\nthree\nfour\n")
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "(stopped)" in said and "cannot reach" in said, result.output
    assert "the connection broke off before the answer ended; ask again" in said
    assert client.requests[2]["messages"] == [{"role": "user", "content": "three"}]  # neither taken along
