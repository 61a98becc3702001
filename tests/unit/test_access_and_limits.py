import asyncio

import pytest

from tests.unit.conftest import REVIEWER_KEY

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_missing_or_wrong_key_is_401_in_openai_shape(served):
    r = await served.client.post(CHAT, json=BODY, headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    r = await served.client.post(CHAT, json=BODY, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await served.client.post("/mcq", json={"question": "q", "options": ["a", "b"]},
                                 headers={"Authorization": "Basic abc"})
    assert r.status_code == 401


async def test_health_and_metrics_are_open(served):
    for path in ("/healthz", "/readyz", "/metrics"):
        r = await served.client.get(path, headers={"Authorization": ""})
        assert r.status_code == 200, path


async def test_every_role_may_chat(served):
    r = await served.client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {REVIEWER_KEY}"})
    assert r.status_code == 200


async def test_rate_limit_is_429_with_retry_after(app_factory):
    async with app_factory(rate_limit="3/minute") as served:
        statuses = [(await served.client.post(CHAT, json=BODY)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        r = await served.client.post(CHAT, json=BODY)
        assert 1 <= int(r.headers["retry-after"]) <= 60 and r.json()["error"]["type"] == "rate_limit_error"
        # another key has its own budget
        other = await served.client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {REVIEWER_KEY}"})
        assert other.status_code == 200


async def test_body_over_the_limit_is_413(app_factory):
    async with app_factory(max_body_bytes=2000) as served:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        r = await served.client.post(CHAT, json=big)
        assert r.status_code == 413 and "ZEPHYR_MAX_BODY_BYTES" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "body_too_large"
        assert (await served.client.post(CHAT, json=BODY)).status_code == 200


async def test_overload_is_503_not_an_unbounded_queue(app_factory):
    async with app_factory(max_in_flight=2) as served:
        served.engine.delay = 0.05
        slow = {"messages": BODY["messages"], "max_tokens": 10}
        results = await asyncio.gather(*(served.client.post(CHAT, json=slow) for _ in range(4)))
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 200, 503, 503]
        rejected = next(r for r in results if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["code"] == "overloaded"
        served.engine.delay = 0
        assert (await served.client.post(CHAT, json=BODY)).status_code == 200


async def test_n_answers_take_n_places_of_admission(app_factory):
    """n answers are n sequences in the engine: counted as one request, 256 places admitted 2,048 sequences onto an
    engine of 64 (found by a review)."""
    async with app_factory(max_in_flight=4) as served:
        admission = served.app.state.tutor.admission
        admission.in_flight = 2
        for path, body in ((CHAT, {**BODY, "n": 3, "temperature": 0.7}),
                           ("/v1/completions", {"prompt": "Plants need", "max_tokens": 4, "n": 3})):
            r = await served.client.post(path, json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            assert (await served.client.post(path, json={**body, "n": 2})).status_code == 200
        assert admission.in_flight == 2  # every place given back
        # more answers than the replica admits at once could never run: a 400 naming the setting, not a 503
        admission.in_flight = 0
        r = await served.client.post(CHAT, json={**BODY, "n": 5, "temperature": 0.7})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert "at most 4 (ZEPHYR_MAX_IN_FLIGHT)" in r.json()["error"]["message"]


async def test_a_full_replica_refuses_before_the_guard_reads_the_request(app_factory):
    # The guard's screening runs on the encoder's one thread, where the sentences of the answers being streamed
    # wait their turn: a request that will be refused must not queue there first.
    async with app_factory(max_in_flight=1, safety_guard=True) as served:
        served.app.state.tutor.admission.in_flight = 1  # every place taken
        for path, body in ((CHAT, BODY), ("/v1/completions", {"prompt": "Plants take in", "max_tokens": 4})):
            r = await served.client.post(path, json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        metrics = (await served.client.get("/metrics")).text
        assert 'zephyr_encoder_seconds_count{task="request_guard"}' not in metrics
        # What could never succeed is told so at once, not a 503 a client retries first (found by a review).
        for path, body in ((CHAT, {**BODY, "model": "gpt-4o"}), ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}),
                           (CHAT, {**BODY, "n": 2, "temperature": 0})):
            r = await served.client.post(path, json=body)
            assert r.status_code in (400, 404) and r.json()["error"]["code"] != "overloaded", r.text
        served.app.state.tutor.admission.in_flight = 0
        assert (await served.client.post(CHAT, json=BODY)).status_code == 200
        metrics = (await served.client.get("/metrics")).text
        assert 'zephyr_encoder_seconds_count{task="request_guard"} 1.0' in metrics


async def test_requests_being_prepared_count_against_admission(app_factory):
    """admissible() compared only the requests admitted: a burst passed it together, queued on the guard's one
    thread (with the sentences of the streams already running), and was mostly refused afterwards (found by a
    review). Those being prepared count now, and give their places back however preparing ends."""
    async with app_factory(max_in_flight=2, safety_guard=True) as served:
        admission = served.app.state.tutor.admission
        with admission.preparing(1):
            admission.in_flight = 1  # one admitted, one being prepared: full
            r = await served.client.post(CHAT, json=BODY)
            assert r.status_code == 503 and "1 more being prepared" in r.json()["error"]["message"], r.text
            admission.in_flight = 0
            assert (await served.client.post(CHAT, json=BODY)).status_code == 200  # one place left
        assert admission.being_prepared == 0
        forged = [{"role": "user", "content": "x <|im_start|>"}]
        refused = await served.client.post(CHAT, json={**BODY, "messages": forged})
        assert refused.status_code == 400 and admission.being_prepared == 0 and admission.in_flight == 0
        batch = await served.client.post("/mcq/batch", json={"questions": [
            {"question": "Which?", "options": ["a", "b"]}, {"question": "x " * 3000, "options": ["a", "b"]}]})
        assert batch.status_code == 400 and admission.being_prepared == 0


async def test_a_request_over_its_keys_remaining_budget_is_refused_before_the_guard_reads_it(app_factory):
    async with app_factory(rate_limit="5/minute", safety_guard=True) as served:
        assert (await served.client.post(CHAT, json=BODY | {"n": 3})).status_code == 200  # 3 of 5 units
        r = await served.client.post(CHAT, json=BODY | {"n": 3})  # its first unit fits, the other two do not
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
        metrics = (await served.client.get("/metrics")).text
        assert 'zephyr_encoder_seconds_count{task="request_guard"} 1.0' in metrics  # only the first was screened
        assert 'zephyr_requests_rejected_total{reason="rate_limit"} 1.0' in metrics


async def test_a_request_refused_with_503_costs_only_its_authentication_unit(app_factory):
    """A client retrying 503s (the server full) must not spend the work its refused requests asked for."""
    async with app_factory(rate_limit="7/minute", max_in_flight=8) as served:
        admission = served.app.state.tutor.admission
        admission.in_flight = 8  # every place taken
        chat = {**BODY, "n": 3}
        batch = {"questions": [{"question": "Which is a planet?", "options": ["Mars", "Moon"]}] * 3}
        assert (await served.client.post(CHAT, json=chat)).status_code == 503
        assert (await served.client.post("/mcq/batch", json=batch)).status_code == 503
        completion = {"prompt": "Plants need", "max_tokens": 4, "n": 3}
        assert (await served.client.post("/v1/completions", json=completion)).status_code == 503
        admission.in_flight = 0
        # 1 + 1 + 1 for the refused requests, then 1 + 2 for a chat of three answers: 6 of the 7 units
        assert (await served.client.post(CHAT, json=chat)).status_code == 200
        assert (await served.client.post(CHAT, json=chat)).status_code == 429  # 6 + 3 is over the limit
        assert admission.in_flight == 0  # refused inside its admission, and its place given back
        admission.in_flight = 8  # full again: a request no window could hold is still a 400, not a 503 to retry
        too_big = await served.client.post(CHAT, json={**BODY, "n": 8},
                                           headers={"Authorization": f"Bearer {REVIEWER_KEY}"})
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "request_too_large"


async def test_open_mode_without_keys_serves_without_a_header(app_factory):
    async with app_factory(api_keys="") as served:
        r = await served.client.post(CHAT, json=BODY, headers={"Authorization": ""})
        assert r.status_code == 200


async def test_keys_from_a_file_with_comments(app_factory, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# teaching assistants\nreviewer:ta-key-000000001\n\nstudent:pupil-key-0000002\n")
    async with app_factory(api_keys="", api_keys_file=keys) as served:
        for key, status in (("ta-key-000000001", 200), ("pupil-key-0000002", 200), ("student-key-123456", 401)):
            r = await served.client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status, key


async def test_unknown_routes_and_methods_answer_in_openai_shape(served):
    r = await served.client.get("/v1/embeddings")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = await served.client.get(CHAT)
    assert r.status_code == 405 and r.json()["error"]["message"]


async def test_non_utf8_body_is_400(served):
    body = b'{"messages": "\xff\xfe"}'
    r = await served.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400


async def test_roles_are_enforced_and_admin_may_do_anything(app_factory):
    from fastapi import Depends

    from service.auth import require
    from tests.unit.conftest import ADMIN_KEY

    async with app_factory() as served:
        @served.app.get("/review-only")
        async def review_only(principal=Depends(require("reviewer"))):
            return {"role": principal.role}

        r = await served.client.get("/review-only")  # the fixture's student key
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert "needs the role reviewer" in r.json()["error"]["message"]
        for key, role in ((REVIEWER_KEY, "reviewer"), (ADMIN_KEY, "admin")):
            r = await served.client.get("/review-only", headers={"Authorization": f"Bearer {key}"})
            assert r.json() == {"role": role}


async def test_an_empty_rate_limit_turns_limiting_off(app_factory):
    async with app_factory(rate_limit="") as served:
        statuses = {(await served.client.post(CHAT, json=BODY)).status_code for _ in range(5)}
        assert statuses == {200}


async def test_draining_finishes_requests_in_flight_and_refuses_new_ones_with_503(served):
    served.engine.delay = 0.05
    in_flight = asyncio.create_task(served.client.post(CHAT, json={**BODY, "max_tokens": 10}))
    await asyncio.sleep(0.1)  # 10 tokens at 0.05 s each: still running
    assert served.app.state.tutor.admission.in_flight == 1
    served.app.state.tutor.admission.drain()  # what the first SIGTERM does

    refused = await served.client.post(CHAT, json=BODY)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["connection"] == "close" and refused.headers["retry-after"] == "1"
    mcq = await served.client.post("/mcq", json={"question": "q", "options": ["a", "b"]})
    assert mcq.status_code == 503
    assert (await served.client.get("/readyz")).json()["error"]["code"] == "shutting_down"
    assert (await served.client.get("/healthz")).status_code == 200  # alive: no restart while draining

    finished = await in_flight
    assert finished.status_code == 200 and finished.json()["choices"][0]["finish_reason"] == "length"
    assert served.app.state.tutor.admission.in_flight == 0


def test_an_admission_slot_is_given_back_once_when_its_block_ends_or_by_whoever_took_it():
    from service.metrics import Metrics
    from service.tutor import Admission

    class Alive:
        errored = False

    admission = Admission(3, Metrics(), Alive())
    with admission.admit(2):
        assert admission.in_flight == 2
    assert admission.in_flight == 0
    try:
        with admission.admit():
            raise RuntimeError("the request failed")
    except RuntimeError:
        pass
    assert admission.in_flight == 0
    with admission.admit() as slot:
        release = slot.hand_off()
    assert admission.in_flight == 1  # handed off: the block's end keeps it
    release()
    release()
    assert admission.in_flight == 0


def raw_post(app, path: str, body: dict, gone: asyncio.Event, send, spec_version: str = "2.3") -> asyncio.Task:
    """POSTs `body` to `path` as a server would hand it to the app, on its own task; the client hangs up (an
    http.disconnect) once `gone` is set. Lets a test cut a connection where httpx cannot. `spec_version` "2.4":
    the server's `send` raises OSError on a closed connection, as uvicorn's does, instead of listening for it."""
    import json

    from tests.unit.conftest import STUDENT_KEY

    raw, asked = json.dumps(body).encode(), [False]

    async def receive():
        if not asked[0]:
            asked[0] = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {STUDENT_KEY}".encode()), (b"content-length", str(len(raw)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    return asyncio.create_task(app(scope, receive, send))


async def test_a_stream_holds_its_place_until_the_response_closes(served):
    """The handler returns at once; the stream keeps its admission until it ends, or the client hangs up
    (mid-stream, or before the first byte, when Starlette never starts the generator)."""
    import json

    admission = served.app.state.tutor.admission
    served.engine.delay = 0.05
    body = {**BODY, "max_tokens": 40, "stream": True}

    async def call(hang_up_after_first_chunk: bool, hang_up_at_once: bool = False) -> list[bytes]:
        gone, first_chunk, chunks = asyncio.Event(), asyncio.Event(), []
        if hang_up_at_once:
            gone.set()

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                first_chunk.set()

        task = raw_post(served.app, CHAT, body, gone, send)
        if not hang_up_at_once:
            await asyncio.wait_for(first_chunk.wait(), 10)
            assert admission.in_flight == 1  # the handler has returned; the stream still holds its place
            if hang_up_after_first_chunk:
                gone.set()
        await asyncio.wait_for(task, 10)
        assert admission.in_flight == 0
        return chunks

    finished = await call(hang_up_after_first_chunk=False)
    assert finished[-1] == b"data: [DONE]\n\n"
    cut = await call(hang_up_after_first_chunk=True)
    assert b"data: [DONE]\n\n" not in cut and len(cut) < len(finished)
    at_once = await call(False, hang_up_at_once=True)
    assert len(at_once) <= 1 and b"data: [DONE]\n\n" not in b"".join(at_once)  # at most the role chunk went out
    log = await served.flushed_log()
    for chunks, status in ((finished, "ok"), (cut, "aborted")):
        request_id = json.loads(chunks[0].decode().removeprefix("data: "))["id"]
        row = await log.get(request_id)
        assert row["status"] == status
        # An answer cut short is not judged for looping: how it would have gone on is unknown.
        assert ("looping" in row["response"][0]) is (status == "ok")
    # a client gone before its answer started is logged too (aborted), not lost with its request
    from sqlalchemy import select

    from service.store.models import Generation

    async with log.engine.connect() as connection:
        statuses = sorted(r.status for r in await connection.execute(select(Generation.status)))
    assert statuses == ["aborted", "aborted", "ok"]
    answers = (await served.client.get("/metrics")).text
    assert 'zephyr_answers_total{looping="false",route="chat"} 1.0' in answers  # the finished stream only


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_stream_whose_client_left_before_its_answer_started_is_logged(served, path, spec_version):
    """A client gone while its request was screened and tokenized: Starlette cancels the stream at its first send
    (uvicorn, ASGI 2.3) or never starts it (a server whose send raises, ASGI 2.4), so the row the answer writes when
    it runs was lost with the request, and under 2.4 the disconnect was logged as an unhandled error."""
    from sqlalchemy import select

    from service.store.models import Generation

    gone = asyncio.Event()
    gone.set()

    async def send(message):
        if spec_version == "2.4":
            raise OSError("the connection is closed")
        await asyncio.sleep(0.05)  # a real socket's send waits: long enough for the disconnect to be heard

    body = {**BODY, "stream": True} if path == CHAT else {"prompt": "Plants need", "max_tokens": 4, "stream": True}
    await asyncio.wait_for(raw_post(served.app, path, body, gone, send, spec_version=spec_version), 10)
    assert served.app.state.tutor.admission.in_flight == 0
    log = await served.flushed_log()
    async with log.engine.connect() as connection:
        rows = (await connection.execute(select(Generation.status, Generation.error))).all()
    assert [r.status for r in rows] == ["aborted"] and "before" in rows[0].error


async def test_a_stream_cancelled_at_shutdown_before_its_answer_finished_says_so(served):
    """Past the drain, uvicorn cancels what is left: the row must not blame the student. (The headers go out with
    the first event, after the answer's first step: the answer has started.)"""
    from sqlalchemy import select

    from service.store.models import Generation

    tutor = served.app.state.tutor
    gone = asyncio.Event()

    async def send(message):  # admitted and tokenized; then the server stops before the first step
        tutor.admission.draining = True
        gone.set()
        await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(raw_post(served.app, CHAT, {**BODY, "stream": True}, gone, send), 10)
    finally:
        tutor.admission.draining = False
    log = await served.flushed_log()
    async with log.engine.connect() as connection:
        rows = (await connection.execute(select(Generation.status, Generation.error))).all()
    assert [tuple(r) for r in rows] == [
        ("aborted", "the server was shutting down before the answer finished (or the client left)")]


QUESTION = {"question": "Which gas do plants absorb from the air?", "options": ["Oxygen", "Carbon dioxide"]}


@pytest.mark.parametrize(("path", "body", "rows", "at_once"), [
    (CHAT, {**BODY, "max_tokens": 40}, 1, False),
    ("/mcq", {**QUESTION, "method": "letter"}, 1, False),
    ("/mcq", QUESTION, 1, True),  # gone while its prompts are still being encoded
    ("/mcq/batch", {"questions": [QUESTION, QUESTION, QUESTION]}, 3, False),
])
async def test_a_client_that_hangs_up_is_no_server_error_and_frees_its_place(served, path, body, rows, at_once):
    """A closed tab cancels the work, logs it as aborted and counts as 499 (nginx's "client closed request"),
    not as a 500 with a traceback that would page an operator."""
    from sqlalchemy import select

    from service.store.models import Generation

    served.engine.delay = served.engine.score_delay = 0.2
    gone, sent = asyncio.Event(), []

    async def send(message):
        sent.append(message)

    calls = len(served.engine.calls)
    if at_once:
        gone.set()
    task = raw_post(served.app, path, body, gone, send)
    for _ in range(0 if at_once else 200):  # until the engine has the work
        if len(served.engine.calls) > calls:
            break
        await asyncio.sleep(0.01)
    assert at_once or (len(served.engine.calls) > calls and not task.done())
    gone.set()
    await asyncio.wait_for(task, 10)  # returns: no exception escapes to the server

    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert served.app.state.tutor.admission.in_flight == 0
    log = await served.flushed_log()
    async with log.engine.connect() as connection:
        statuses = [r.status for r in await connection.execute(select(Generation.status))]
    assert statuses == ["aborted"] * rows
    metrics = (await served.client.get("/metrics")).text
    assert f'route="{path}",status="499"' in metrics and f'route="{path}",status="500"' not in metrics


def test_retry_after_leaves_room_for_the_whole_request(monkeypatch):
    """The window's reset frees its oldest units only: told to come back then, a request of 7 units was refused
    again (six were free at that time)."""
    import time

    from service.auth import Limiter
    from service.errors import APIError

    now = [1000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    limiter = Limiter("10/minute", "units")
    limiter.hit("key", 6)
    now[0] = 1030.0
    limiter.hit("key", 4)
    now[0] = 1031.0
    with pytest.raises(APIError) as one:
        limiter.check("key", 1)
    assert int(one.value.headers["Retry-After"]) == 29  # a single unit: the oldest units' expiry is room enough
    with pytest.raises(APIError) as refused:
        limiter.check("key", 7)
    now[0] += int(refused.value.headers["Retry-After"])
    limiter.check("key", 7)  # room now, as promised


async def test_a_chat_of_two_answers_is_told_to_wait_until_both_fit(app_factory, monkeypatch):
    """`require` counts a request's first unit and admission the rest: a 2-answer chat refused for its second unit
    was told to come back when one unit was free, and was refused again."""
    import time

    now = [1000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    async with app_factory(rate_limit="3/minute") as served:
        assert (await served.client.post(CHAT, json=BODY)).status_code == 200
        now[0] = 1030.0
        assert (await served.client.post(CHAT, json=BODY)).status_code == 200
        now[0] = 1031.0
        r = await served.client.post(CHAT, json={**BODY, "n": 2})  # its first unit fits, its second does not
        assert r.status_code == 429
        now[0] += int(r.headers["Retry-After"])
        assert (await served.client.post(CHAT, json={**BODY, "n": 2})).status_code == 200


async def test_a_handler_cancelled_at_shutdown_waits_for_its_work_before_closing_the_stream_it_read():
    """Past the drain, uvicorn cancels a handler still reading a stream's first event: it closed that stream while
    the cancelled read still ran in it (RuntimeError: aclose(): asynchronous generator is already running),
    logged as an ASGI error in place of the cancellation (found by a review)."""
    from service.disconnect import until_disconnected

    async def events():
        await asyncio.sleep(30)
        yield "data: never\n\n"

    class Connected:  # a client that never leaves
        async def receive(self):
            await asyncio.sleep(60)

    stream = events()

    async def first() -> str:
        return await anext(stream)

    async def handler() -> None:  # what routes/openai.py `answer` does around its read-ahead
        try:
            await until_disconnected(Connected(), first())
        except BaseException:
            await stream.aclose()
            raise

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
