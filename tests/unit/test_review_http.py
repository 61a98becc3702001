"""The review loop over HTTP (stub engine, SQLite): candidates made after the answer, access rules, sign-in,
verdicts through the API, statistics and export (HTTP and CLI)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import openai
from typer.testing import CliRunner

from cli.app import app as cli
from loadtest.harness import linked_home
from service.errors import sqlstate
from tests.unit.conftest import ADMIN_KEY, REVIEWER_KEY, STUDENT_KEY

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "What is photosynthesis?"}], "max_tokens": 8}
REVIEWER = {"Authorization": f"Bearer {REVIEWER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MARKED = {"X-Zephyr-Review": "true"}


async def settled(running):
    """Waits for review candidates in flight, then for the log to be written."""
    await running.app.state.tutor.candidates.idle()
    return await running.flushed_log()


async def rows(running) -> list[dict]:
    log = await settled(running)
    from sqlalchemy import select

    from service.store.models import Generation

    async with log.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(select(Generation).order_by(Generation.created_at))).mappings()]


async def test_a_sampled_chat_gets_a_candidate_after_its_answer(app_factory):
    async with app_factory(review_share=1.0, review_candidate_temperature=0.7) as served:
        r = await served.client.post(CHAT, json={**BODY, "temperature": 0.0, "seed": 5})
        assert r.status_code == 200
        request_id = r.json()["id"]
        stored = await rows(served)
        original, candidate = stored
        assert original["id"] == request_id and original["review_kind"] == "pair"
        assert original["purpose"] == "served" and not original["review_requested"]
        assert candidate["purpose"] == "candidate" and candidate["parent_id"] == request_id
        assert candidate["route"] == "review_candidate" and candidate["messages"] == original["messages"]
        assert candidate["params"]["temperature"] == 0.7 and candidate["params"]["variant"] == "T=0.7"
        assert candidate["params"]["seed"] != 5 and candidate["params"]["max_tokens"] == 8
        metrics = (await served.client.get("/metrics")).text
        assert 'zephyr_review_candidates_total{outcome="ok"} 1.0' in metrics
        assert 'zephyr_completion_tokens_total{route="review_candidate"}' in metrics
        assert "zephyr_review_items_total 1.0" in metrics


async def test_marked_requests_policy_and_bad_header(app_factory, tmp_path, default_model):
    def home(name: str):
        return linked_home(tmp_path / name, default_model)

    async with app_factory(review_share=0.0) as served:
        await served.client.post(CHAT, json=BODY)
        marked = await served.client.post(CHAT, json={**BODY, "stream": True}, headers=MARKED)
        assert marked.status_code == 200 and "[DONE]" in marked.text
        bad = await served.client.post(CHAT, json=BODY, headers={"X-Zephyr-Review": "maybe"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Zephyr-Review"
        stored = await rows(served)
        kinds = [(r["purpose"], r["review_requested"], r["review_kind"]) for r in stored]
        assert kinds == [("served", False, None), ("served", True, "pair"), ("candidate", False, None)]
    async with app_factory(review_policy="off", home=home("off")) as served:
        await served.client.post(CHAT, json=BODY, headers=MARKED)
        assert [r["review_kind"] for r in await rows(served)] == [None]
    async with app_factory(review_candidate="none", home=home("none")) as served:
        await served.client.post(CHAT, json=BODY, headers=MARKED)
        assert [r["review_kind"] for r in await rows(served)] == ["single"]
    async with app_factory(review_max_pending=0, home=home("full")) as served:
        await served.client.post(CHAT, json=BODY, headers=MARKED)
        assert [r["review_kind"] for r in await rows(served)] == ["single"]
        assert 'zephyr_review_candidates_total{outcome="dropped"} 1.0' in (await served.client.get("/metrics")).text


async def test_the_review_budget_counts_only_chats_that_go_to_review(app_factory, tmp_path, default_model):
    def home(name: str):
        return linked_home(tmp_path / name, default_model)

    async def statuses(served, headers, times=3):
        return [(await served.client.post(CHAT, json=BODY, headers=headers)).status_code for _ in range(times)]

    # Review off: a marked chat is answered and never reviewed, so it costs the key nothing.
    async with app_factory(review_policy="off", review_request_limit="1/hour", home=home("off")) as served:
        assert await statuses(served, MARKED) == [200, 200, 200]
        assert [r["review_kind"] for r in await rows(served)] == [None] * 3
    # Chats the sampler picks are not the key's marks either; its marked chats are counted.
    async with app_factory(review_share=1.0, review_candidate="none", review_request_limit="1/hour",
                           home=home("sample")) as served:
        assert await statuses(served, {}) == [200, 200, 200]
        assert await statuses(served, MARKED) == [200, 429, 429]
        assert [r["review_kind"] for r in await rows(served)] == ["single"] * 4
    async with app_factory(review_policy="requested", review_candidate="none", review_request_limit="1/hour",
                           home=home("requested")) as served:
        assert await statuses(served, MARKED, 2) == [200, 429]


async def test_a_review_item_is_one_answer_so_a_chat_with_n_answers_is_not_one(app_factory):
    async with app_factory(review_share=1.0) as served:
        marked = await served.client.post(CHAT, json={**BODY, "n": 2}, headers=MARKED)
        assert marked.status_code == 400 and marked.json()["error"]["param"] == "n", marked.text
        assert "n=1" in marked.json()["error"]["message"]
        sampled = await served.client.post(CHAT, json={**BODY, "n": 2})  # the sampler would pick every chat
        assert sampled.status_code == 200
        assert [r["review_kind"] for r in await rows(served)] == [None]
    async with app_factory(review_policy="off") as served:  # no review: the mark changes nothing
        assert (await served.client.post(CHAT, json={**BODY, "n": 2}, headers=MARKED)).status_code == 200


@asynccontextmanager
async def served_with_remote_candidate(app_factory, remote, **settings):
    """A server whose review candidates come from `remote` (another app in this process), as from a second server."""
    async with app_factory(review_candidate="remote", review_candidate_url="http://remote/v1",
                           review_candidate_model="smollm2-135m-instruct", review_candidate_api_key=STUDENT_KEY,
                           **settings) as served:
        candidates = served.app.state.tutor.candidates
        await candidates._remote.close()
        candidates._remote = openai.AsyncOpenAI(
            base_url="http://remote/v1", api_key=STUDENT_KEY,
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=remote.app)))
        yield served


async def test_candidate_from_a_second_served_model(app_factory, tmp_path, default_model):
    async with app_factory(home=linked_home(tmp_path / "remote-home", default_model)) as remote:
        remote.engine.reply = "Plants make sugar from light, water and carbon dioxide."
        async with served_with_remote_candidate(app_factory, remote) as served:
            await served.client.post(CHAT, json={**BODY, "max_tokens": 40, "stop": ["zzz"], "presence_penalty": 0.5,
                                                 "top_k": 5}, headers=MARKED)
            original, candidate = await rows(served)
            assert candidate["parent_id"] == original["id"] and candidate["status"] == "ok"
            [asked] = await rows(remote)  # asked as the student's chat was
            assert asked["params"]["stop"] == ["zzz"] and asked["params"]["presence_penalty"] == 0.5
            assert asked["params"]["top_k"] == 5  # vLLM's extras too
            # Each row names the weights that wrote it: the remote's, as its /v1/models says.
            def revision(app) -> str:
                return app.state.registry_entry.manifest.revision

            assert original["model_revision"] == revision(served.app)
            assert asked["model_revision"] == candidate["model_revision"] == revision(remote.app)
            assert candidate["response"][0]["content"] == remote.engine.reply
            assert candidate["completion_tokens"] > 0 and candidate["params"]["variant"] == "remote"
            # Counted with the served answers, under its own route: an A/B's candidate loops in plain sight too.
            assert candidate["response"][0]["looping"] is False
            assert 'zephyr_answers_total{looping="false",route="review_candidate"} 1.0' in \
                (await served.client.get("/metrics")).text


async def test_a_remote_candidate_to_a_pasted_question_writes_its_own_opening_unsteered(app_factory, tmp_path,
                                                                                          default_model):
    """The tutor opens its answer to a pasted question with /mcq's pick and bans the other options' conclusions; the
    remote writes its own opening, so it gets neither the ban (a Zephyr server refuses the field; vLLM would steer it
    to the served pick) nor a min_tokens the opening already covered."""
    from tests.unit.test_chat_mcq import PASTED

    async with app_factory(home=linked_home(tmp_path / "remote-home", default_model)) as remote:
        async with served_with_remote_candidate(app_factory, remote) as served:
            body = {"messages": [{"role": "user", "content": PASTED}], "max_tokens": 60, "min_tokens": 20}
            assert (await served.client.post(CHAT, json=body, headers=MARKED)).status_code == 200
            logged = {row["route"]: row for row in await rows(served)}  # the chat, its /mcq scoring, the candidate
            original, candidate = logged["chat"], logged["review_candidate"]
            assert original["params"]["mcq"]["keep_answer"] is True  # the served answer was steered
            assert candidate["status"] == "ok", candidate["error"]
            assert candidate["params"]["min_tokens"] == 20 and candidate["params"]["max_tokens"] == 60  # as sent
            asked = {row["route"]: row for row in await rows(remote)}["chat"]
            assert asked["params"]["max_tokens"] == 60 and "mcq" in asked["params"]  # it wrote its own opening


async def test_a_remote_candidate_is_screened_by_this_servers_guard(app_factory, tmp_path, default_model):
    from tests.unit.test_safety import HARMFUL_ANSWER, SCIENCE_SENTENCE
    from zephyr.safety import FINISH_REASON, HARMFUL, REPLIES

    async with app_factory(home=linked_home(tmp_path / "remote-home", default_model)) as remote:  # no guard there
        remote.engine.reply = HARMFUL_ANSWER
        async with served_with_remote_candidate(app_factory, remote, safety_guard=True) as served:
            body = {"messages": [{"role": "user", "content": "How do plants make food?"}], "max_tokens": 300}
            await served.client.post(CHAT, json=body, headers=MARKED)
            original, candidate = await rows(served)
            assert candidate["parent_id"] == original["id"] and candidate["params"]["max_tokens"] == 300
            assert candidate["response"][0]["content"] == f"{SCIENCE_SENTENCE}\n\n{REPLIES[HARMFUL]}"
            assert candidate["response"][0]["finish_reason"] == FINISH_REASON
            assert candidate["params"]["answer_safety"]["0"]["category"] == HARMFUL


REVIEW_ROUTES = [
    ("GET", "/review/api/me", None), ("GET", "/review/api/next", None),
    ("POST", "/review/api/verdicts", {"assignment_id": 1, "verdict": "tie"}),
    ("POST", "/review/api/skip", {"assignment_id": 1}), ("POST", "/review/api/undo", None),
    ("GET", "/review/stats", None), ("GET", "/review/export?format=dpo", None),
]


async def test_review_access_rules(served):
    for method, path, body in REVIEW_ROUTES:
        anonymous = await served.client.request(method, path, json=body, headers={"Authorization": ""})
        assert anonymous.status_code == 401, path
        student = await served.client.request(method, path, json=body)
        assert student.status_code == 403, path
        assert student.json()["error"]["type"] == "permission_error"
    export = await served.client.get("/review/export?format=dpo", headers=REVIEWER)
    assert export.status_code == 403 and "admin" in export.json()["error"]["message"]
    # students' conversations stay out of the browser's disk cache (shared school machines)
    for path, headers in (("/review/export?format=dpo", ADMIN), ("/review/stats", REVIEWER),
                          ("/review/api/next", REVIEWER), ("/review/api/me", REVIEWER)):
        r = await served.client.get(path, headers=headers)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store", path
    bad_format = await served.client.get("/review/export?format=csv", headers=ADMIN)
    assert bad_format.status_code == 400 and "format" in bad_format.json()["error"]["message"]
    # found by the API fuzz: a `since` whose UTC time falls before year 1 was a 500
    edge = await served.client.get("/review/export", params={"format": "dpo", "since": "0001-01-01T00:00:00+00:01"},
                                   headers=ADMIN)
    assert edge.status_code == 400 and edge.json()["error"]["param"] == "since"
    edge = await served.client.get("/review/export", headers=ADMIN,
                                   params={"format": "dpo", "judged_since": "9999-12-31T23:59:59-00:01"})
    assert edge.status_code == 400 and edge.json()["error"]["param"] == "judged_since"


async def test_review_routes_answer_503_while_the_database_is_away(app_factory):
    # Nothing listens on port 1: the generation log spills, and the review routes say to retry.
    async with app_factory(db_url="postgresql+asyncpg://zephyr:zephyr@127.0.0.1:1/zephyr") as served:
        for method, path in (("GET", "/review/api/next"), ("GET", "/review/stats")):
            r = await served.client.request(method, path, headers=REVIEWER)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "database_unavailable" and r.headers["retry-after"] == "5"
        assert (await served.client.post(CHAT, json=BODY)).status_code == 200  # students are not affected


async def postgres_starting_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every connection the way PostgreSQL does while it restarts: SQLSTATE 57P03 in an ErrorResponse."""
    while True:
        length = int.from_bytes(await reader.readexactly(4), "big")
        code = int.from_bytes(await reader.readexactly(4), "big")
        await reader.readexactly(length - 8)
        if code != 80877103:  # anything but an SSLRequest is the StartupMessage
            break
        writer.write(b"N")  # no TLS; the client goes on in plain text
    fields = b"SFATAL\0C57P03\0Mthe database system is starting up\0\0"
    writer.write(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)
    await writer.drain()
    writer.close()


async def test_review_routes_answer_503_while_postgres_is_starting_up(app_factory):
    # asyncpg raises CannotConnectNowError, which SQLAlchemy passes on as a bare DBAPIError, not OperationalError.
    server = await asyncio.start_server(postgres_starting_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, app_factory(db_url=f"postgresql+asyncpg://zephyr:zephyr@127.0.0.1:{port}/zephyr") as served:
        r = await served.client.get("/review/api/next", headers=REVIEWER)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable" and r.headers["retry-after"] == "5"


async def test_review_routes_answer_503_when_the_database_host_does_not_resolve(app_factory):
    async with app_factory(db_url="postgresql+asyncpg://zephyr:zephyr@db.invalid:5432/zephyr") as served:
        r = await served.client.get("/review/api/next", headers=REVIEWER)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable"


def test_sqlstate_is_found_inside_sqlalchemys_wrapping():
    import asyncpg
    from sqlalchemy.exc import DBAPIError

    def wrapped(error: Exception) -> DBAPIError:
        return DBAPIError("SELECT 1", None, error)

    assert sqlstate(wrapped(asyncpg.exceptions.CannotConnectNowError("starting up"))) == "57P03"
    assert sqlstate(wrapped(asyncpg.exceptions.UniqueViolationError("duplicate key"))) == "23505"
    assert sqlstate(wrapped(ValueError("no code"))) is None


async def test_sign_in_cookie(served):
    client = served.client
    refused = await client.post("/review/session", json={"key": STUDENT_KEY})
    assert refused.status_code == 403 and "reviewer key" in refused.json()["error"]["message"]
    assert (await client.post("/review/session", json={"key": "nope"})).status_code == 401
    signed = await client.post("/review/session", json={"key": REVIEWER_KEY})
    assert signed.status_code == 200
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/review" in cookie
    assert REVIEWER_KEY not in cookie
    me = await client.get("/review/api/me", headers={"Authorization": ""})  # the cookie alone
    assert me.status_code == 200 and me.json()["role"] == "reviewer"
    # The cookie is for the review routes only; chat still needs a key.
    assert (await client.post(CHAT, json=BODY, headers={"Authorization": ""})).status_code == 401
    token = client.cookies.get("zephyr_review")
    client.cookies.set("zephyr_review", token[:-2] + "xx", path="/review")
    forged = await client.get("/review/api/me", headers={"Authorization": ""})
    assert forged.status_code == 401 and "sign in again" in forged.json()["error"]["message"]
    client.cookies.set("zephyr_review", token, path="/review")
    assert (await client.delete("/review/session")).status_code == 204


async def test_a_removed_key_signs_its_holder_out(app_factory):
    async with app_factory() as first:
        await first.client.post("/review/session", json={"key": REVIEWER_KEY})
        token = first.client.cookies.get("zephyr_review")
    async with app_factory(api_keys=f"admin:{ADMIN_KEY}") as second:  # same home, database and secret
        second.client.cookies.set("zephyr_review", token, path="/review")
        r = await second.client.get("/review/api/me", headers={"Authorization": ""})
        assert r.status_code == 401 and "no longer valid" in r.json()["error"]["message"]


async def test_page_is_locked_down(served):
    page = await served.client.get("/review", headers={"Authorization": ""})
    assert page.status_code == 200 and "<title>Zephyr review</title>" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "require-trusted-types-for 'script'; trusted-types zephyr-review" in policy
    assert "<script>" not in page.text  # no inline script: the policy forbids it
    script = await served.client.get("/review/static/review.js", headers={"Authorization": ""})
    # Raw text goes in as text; HTML (the server's sanitized rendering) through one sink, behind Trusted Types.
    assert script.status_code == 200 and "textContent" in script.text
    assert script.text.count("innerHTML") == 1 and 'createPolicy("zephyr-review"' in script.text


async def test_verdicts_through_the_api_feed_stats_and_both_exports(app_factory, tmp_path):
    async with app_factory(review_share=1.0, review_overlap=1) as served:
        served.engine.reply = "Light energy becomes sugar. Mail me at ta@uni.edu"
        served.engine.candidate_reply = "Plants eat light. Mail me at ta@uni.edu"
        for question in ("What is photosynthesis?", "What is respiration?"):
            await served.client.post(CHAT, json={"messages": [{"role": "user", "content": question}],
                                                 "max_tokens": 30})
        await settled(served)
        client = served.client
        first = (await client.get("/review/api/next", headers=REVIEWER)).json()
        assert first["progress"] == {"judged": 0, "waiting": 1}  # the other item; this one is held
        item = first["item"]
        assert item["kind"] == "pair" and "<EMAIL_ADDRESS>" in item["answers"][0]["text"]
        wrong = await client.post("/review/api/verdicts", headers=REVIEWER,
                                  json={"assignment_id": item["assignment_id"], "verdict": "a"})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "strength"
        unknown = await client.post("/review/api/verdicts", headers=REVIEWER,
                                    json={"assignment_id": item["assignment_id"], "verdict": "meh"})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "verdict"
        long = await client.post("/review/api/verdicts", headers=REVIEWER, json={
            "assignment_id": item["assignment_id"], "verdict": "tie", "comment": "x" * 2001})
        assert long.status_code == 400 and long.json()["error"]["param"] == "comment"
        # At the limit as typed, though redaction's placeholders make it longer: taken.
        comment = ("Ask a@b.co about it. " * 100)[:2000]
        ok = await client.post("/review/api/verdicts", headers=REVIEWER, json={
            "assignment_id": item["assignment_id"], "verdict": "a", "strength": 2, "flags": {"B": ["off_topic"]},
            "comment": comment})
        assert ok.status_code == 201 and ok.json()["progress"] == {"judged": 1, "waiting": 1}
        second = (await client.get("/review/api/next", headers=REVIEWER)).json()["item"]
        await client.post("/review/api/skip", headers=REVIEWER, json={"assignment_id": second["assignment_id"]})
        assert (await client.get("/review/api/next", headers=REVIEWER)).json() == {
            "item": None, "progress": {"judged": 1, "waiting": 0}}

        stats = (await client.get("/review/stats", headers=REVIEWER)).json()
        assert stats["verdicts"] == 1 and stats["strength"]["2"] == 1 and stats["flags"]["off_topic"] == 1
        assert stats["reviewers"][0]["judged"] == 1 and stats["reviewers"][0]["skipped"] == 1
        assert 'zephyr_review_verdicts_total{verdict="a"} 1.0' in (await client.get("/metrics")).text

        http_export = await client.get("/review/export?format=dpo", headers=ADMIN)
        assert http_export.headers["x-record-count"] == "1"
        record = json.loads(http_export.text)
        assert record["meta"]["item_ids"] == [item["item_id"]] and record["meta"]["reviewers"] == 1
        weights = served.app.state.registry_entry.manifest.revision  # the bundled model's digest wrote both
        assert record["meta"]["chosen_revision"] == record["meta"]["rejected_revision"] == weights
        assert weights.startswith("sha256:")

        out = tmp_path / "dpo.jsonl"
        result = await asyncio.to_thread(
            CliRunner().invoke, cli, ["review", "export", "--format", "dpo", "--out", str(out)],
            env={"ZEPHYR_HOME": str(served.settings.home), "ZEPHYR_REVIEW_OVERLAP": "1"})
        assert result.exit_code == 0, result.output
        assert out.read_text() == http_export.text  # one export, whichever way it is asked for
        # after the last export: the verdict given now is in one from an hour ago, in none from an hour on
        for hours, records in ((-1, "1"), (1, "0")):
            at = (datetime.now(UTC) + timedelta(hours=hours)).isoformat()
            later = await client.get("/review/export", params={"format": "dpo", "judged_since": at}, headers=ADMIN)
            assert later.headers["x-record-count"] == records, hours
            result = await asyncio.to_thread(
                CliRunner().invoke, cli, ["review", "export", "--format", "dpo", "--out", str(tmp_path / "later"),
                                          "--judged-since", at],
                env={"ZEPHYR_HOME": str(served.settings.home), "ZEPHYR_REVIEW_OVERLAP": "1"})
            assert result.exit_code == 0 and (tmp_path / "later").read_text() == later.text, result.output
        assert out.stat().st_mode & 0o777 == 0o600  # students' conversations, private as the database is
        pairs = tmp_path / "pairs.jsonl"
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["data", "review", "--input", str(out), "--out",
                                                                   str(pairs), "--no-clean"])
        assert result.exit_code == 0 and pairs.stat().st_mode & 0o777 == 0o600, result.output
        cleaned = tmp_path / "cleaned.jsonl"
        clean = ["data", "clean", "--input", str(pairs), "--out", str(cleaned), "--format", "dpo", "--no-decontaminate"]
        result = await asyncio.to_thread(CliRunner().invoke, cli, clean)
        assert result.exit_code == 0 and cleaned.stat().st_mode & 0o777 == 0o600, result.output
        # Where each item waits for two reviewers, an item one has judged is not exported unless asked for.
        result = await asyncio.to_thread(
            CliRunner().invoke, cli, ["review", "export", "--format", "dpo", "--out", str(out)],
            env={"ZEPHYR_HOME": str(served.settings.home), "ZEPHYR_REVIEW_OVERLAP": "2"})
        assert result.exit_code == 0 and out.read_text() == "", result.output
        assert "left out 1 item(s) judged by fewer than 2 reviewers" in " ".join(result.output.split())
        assert (await client.get("/review/export?format=dpo&min_reviewers=2", headers=ADMIN)).headers[
            "x-left-out-too-few-reviewers"] == "1"
        table = await asyncio.to_thread(CliRunner().invoke, cli, ["review", "stats"],
                                        env={"ZEPHYR_HOME": str(served.settings.home)})
        assert table.exit_code == 0 and "Win rate by majority vote" in table.output
        bad = await asyncio.to_thread(CliRunner().invoke, cli, ["review", "export", "--format", "dpo", "--out",
                                                                str(out), "--since", "last week"])
        assert bad.exit_code == 1 and "not a date" in bad.output


async def test_an_expired_lease_frees_the_item_and_a_late_verdict_is_still_kept(app_factory):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from service.store.models import ReviewAssignment

    late_key = "reviewer-key-late-0001"
    keys = f"student:{STUDENT_KEY},reviewer:{REVIEWER_KEY},reviewer:{late_key},admin:{ADMIN_KEY}"
    late = {"Authorization": f"Bearer {late_key}"}
    async with app_factory(api_keys=keys, review_share=1.0, review_overlap=1) as served:
        await served.client.post(CHAT, json=BODY)
        log = await settled(served)
        client = served.client
        taken = (await client.get("/review/api/next", headers=late)).json()["item"]
        assert (await client.get("/review/api/next", headers=REVIEWER)).json()["item"] is None  # held by the lease
        async with log.engine.begin() as conn:  # the lease runs out while the first reviewer is away
            await conn.execute(update(ReviewAssignment).values(shown_at=datetime.now(UTC) - timedelta(minutes=31)))
        freed = (await client.get("/review/api/next", headers=REVIEWER)).json()["item"]
        assert freed["item_id"] == taken["item_id"]
        for headers, item in ((REVIEWER, freed), (late, taken)):
            judged = await client.post("/review/api/verdicts", headers=headers,
                                       json={"assignment_id": item["assignment_id"], "verdict": "tie"})
            assert judged.status_code == 201, judged.text
        stats = (await client.get("/review/stats", headers=ADMIN)).json()
        assert stats["verdicts"] == 2 and stats["items"] == {"judged": 1, "complete": 1}


def test_the_comment_box_holds_what_the_api_takes():
    from pathlib import Path

    from service.review import routes

    page = (Path(routes.__file__).parent / "static" / "review.html").read_text()
    assert f'<textarea id="comment" maxlength="{routes.MAX_COMMENT_CHARS}"' in page


async def test_a_second_sign_in_cookie_planted_for_the_parent_domain_is_refused(app_factory):
    """A page on a sibling subdomain can set `zephyr_review` for the parent domain; the browser sends it beside the
    reviewer's own, and the cookie parser kept the last: the reviewer's verdicts went under the planter's name."""
    async with app_factory() as served:
        client = served.client
        assert (await client.post("/review/session", json={"key": REVIEWER_KEY})).status_code == 200
        own = client.cookies.get("zephyr_review")
        both = {"Authorization": "", "Cookie": f"zephyr_review={own}; zephyr_review={own[:-2]}xx"}
        r = await client.get("/review/api/me", headers=both)
        assert r.status_code == 401 and "two review sign-in cookies" in r.json()["error"]["message"], r.text
        assert r.headers["set-cookie"].startswith("zephyr_review=;") and "Max-Age=0" in r.headers["set-cookie"]
        assert (await client.get("/review/api/me", headers={"Authorization": "",
                                                            "Cookie": f"zephyr_review={own}"})).status_code == 200


async def test_over_https_the_sign_in_cookie_is_host_only(app_factory):
    async with app_factory() as served:
        client = served.client
        signed = await client.post("https://testserver/review/session", json={"key": REVIEWER_KEY})
        assert signed.status_code == 200, signed.text
        cookie = signed.headers["set-cookie"]
        assert cookie.startswith("__Host-zephyr_review=") and "Path=/;" in cookie and "Secure" in cookie
        token = cookie.split(";")[0].split("=", 1)[1]
        # the plain name, which a sibling subdomain could set, is not read over HTTPS
        plain = await client.get("https://testserver/review/api/me",
                                 headers={"Authorization": "", "Cookie": f"zephyr_review={token}"})
        assert plain.status_code == 401
        me = await client.get("https://testserver/review/api/me",
                              headers={"Authorization": "", "Cookie": f"__Host-zephyr_review={token}"})
        assert me.status_code == 200 and me.json()["role"] == "reviewer"
        out = await client.delete("https://testserver/review/session",
                                  headers={"Cookie": f"__Host-zephyr_review={token}"})
        cleared = out.headers["set-cookie"]
        # a browser ignores a __Host- cookie's deletion without Secure (the first version's sign-out kept it)
        assert out.status_code == 204 and cleared.startswith("__Host-zephyr_review=") and "Secure" in cleared
        assert "Max-Age=0" in cleared and "Path=/;" in cleared
