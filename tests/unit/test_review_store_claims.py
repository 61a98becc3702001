"""Claiming review items under concurrency (SQLite here; tests/integration/test_review_store.py runs the same
on PostgreSQL): an item is never given to more reviewers than `review_overlap`, however many ask at once."""

from __future__ import annotations

import asyncio
import contextvars
import random
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event

from service.review.store import ReviewPolicy, ReviewStore
from tests.review_data import T0, generation, open_log, pair, seed


class _Dawdling:
    """A connection that pauses after every statement, so that concurrent transactions interleave between
    their reads and their writes (the window a check-then-insert loses the race in)."""

    def __init__(self, conn):
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    async def execute(self, *args, **kwargs):
        result = await self._conn.execute(*args, **kwargs)
        await asyncio.sleep(0.02)
        return result


class Interleaved:
    """An engine whose transactions dawdle (see _Dawdling)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @asynccontextmanager
    async def begin(self):
        async with self._engine.begin() as conn:
            yield _Dawdling(conn)

    @asynccontextmanager
    async def connect(self):
        async with self._engine.connect() as conn:
            yield _Dawdling(conn)


async def claims_at_once(log, overlap: int, reviewers: int, items: int = 1) -> list[str | None]:
    """`reviewers` reviewers ask for an item at the same moment; the item each is given (None: none)."""
    await seed(log, [row for i in range(items) for row in pair(f"i{i}", f"Q{i}", "x", None, minute=i)])
    policy = ReviewPolicy(overlap=overlap, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store = ReviewStore(Interleaved(log.engine), policy, random.Random(7))
    shown = await asyncio.gather(*(store.next_item(f"{i:064x}") for i in range(reviewers)))
    return [view and view["item_id"] for view in shown]


@pytest.fixture
async def log(tmp_path):
    log = await open_log(f"sqlite+aiosqlite:///{tmp_path / 'review.db'}", tmp_path)
    yield log
    await log.close()


@pytest.mark.parametrize("overlap", [1, 2])
async def test_concurrent_reviewers_never_overfill_an_item(log, overlap):
    given = await claims_at_once(log, overlap, reviewers=4)
    assert given.count("i0") == overlap and given.count(None) == 4 - overlap


async def test_a_reviewer_who_loses_the_race_gets_the_next_item(log):
    given = await claims_at_once(log, 1, reviewers=3, items=3)
    assert sorted(given) == ["i0", "i1", "i2"]


async def test_many_reviewers_at_once_each_get_an_item_while_items_wait(log):
    """A claim that succeeded on the last retry was not read back: its reviewer was told nothing waits while it
    held an item."""
    given = await claims_at_once(log, 1, reviewers=8, items=8)
    assert sorted(given) == [f"i{i}" for i in range(8)]


async def test_every_reviewer_of_an_item_sees_the_same_answers_when_its_candidate_comes_mid_claim(log):
    await candidate_comes_mid_claim(log)


async def candidate_comes_mid_claim(log) -> None:
    """r1 reads the item alone (its candidate late); before r1's claim is written, the candidate comes and r2 is
    shown the pair. r1's claim must not then show it alone: the item's verdicts would judge different things."""
    await seed(log, pair("i0", "Q", "x", None, candidate_status="error"))  # picked for a pair, no candidate yet
    policy = ReviewPolicy(overlap=2, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store, views = ReviewStore(log.engine, policy, random.Random(7)), {}
    claim = store._claim

    async def candidate_arrives_first(reviewer, item_id, now, left, right):
        if reviewer == "r1" and "r2" not in views:
            assert right is None  # r1 read the item alone
            messages = [{"role": "system", "content": "You are a tutor."}, {"role": "user", "content": "Q"}]
            await seed(log, [generation("i0-cand", messages, "y", created_at=T0, purpose="candidate", parent_id="i0",
                                        variant="T=1")])
            views["r2"] = await store.next_item("r2")
        return await claim(reviewer, item_id, now, left, right)

    store._claim = candidate_arrives_first
    views["r1"] = await store.next_item("r1")
    assert views["r2"]["kind"] == views["r1"]["kind"] == "pair"
    assert {a["text"] for a in views["r1"]["answers"]} == {a["text"] for a in views["r2"]["answers"]} == {"x", "y"}


async def test_an_item_shown_two_ways_before_that_rule_still_goes_to_the_next_reviewer(log):
    """Assignments written before every claim had to match: one alone, one as a pair. The item is still given out,
    as its first assignment showed it, not refused to every reviewer (it would hide the queue behind it)."""
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from service.store.models import ReviewAssignment

    await seed(log, pair("i0", "Q", "x", "y") + pair("i1", "Q1", "x1", None, minute=1))
    now = datetime.now(UTC)
    async with log.engine.begin() as conn:
        for reviewer, right in (("r1", None), ("r2", "i0-cand")):
            await conn.execute(insert(ReviewAssignment).values(
                item_id="i0", reviewer=reviewer, status="judged", shown_at=now, left_id="i0", right_id=right,
                verdict="good" if right is None else "a", flags={}, judged_at=now))
    policy = ReviewPolicy(overlap=3, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    view = await ReviewStore(log.engine, policy, random.Random(7)).next_item("r3")
    assert view["item_id"] == "i0" and view["kind"] == "single"


async def test_a_chat_with_several_answers_logged_for_review_before_that_rule_is_not_shown(log):
    rows = pair("i0", "Q", "x", "y") + pair("i1", "Q1", "x1", None, minute=1)
    rows[0]["params"] = {"n": 2}  # reviewers would see its first answer only, beside one candidate
    rows[2]["params"] = {"n": 1}
    await seed(log, rows)
    policy = ReviewPolicy(overlap=1, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store = ReviewStore(log.engine, policy, random.Random(7))
    assert (await store.next_item("r1"))["item_id"] == "i1"


async def test_an_undo_racing_another_reviewers_verdict_never_outlives_it(log):
    """Undo is refused once another reviewer has judged the item. The check and the update were two statements: a
    verdict committed between them let the undo through, after the other verdict."""
    from sqlalchemy import select

    from service.errors import APIError
    from service.store.models import ReviewAssignment

    await seed(log, pair("i0", "Q", "x", "y"))
    policy = ReviewPolicy(overlap=2, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store = ReviewStore(Interleaved(log.engine), policy, random.Random(7))
    first, second = await store.next_item("r1"), await store.next_item("r2")
    await store.judge("r1", first["assignment_id"], "tie", None, {}, None)
    # Which request's transaction commits when (the timestamps are taken before each waits for the one writer, so
    # they need not follow the commits).
    who, commits = contextvars.ContextVar("who", default=None), []
    event.listen(log.engine.sync_engine, "commit", lambda _conn: commits.append(who.get()))

    async def as_(name, request):
        who.set(name)
        return await request

    outcome = await asyncio.gather(as_("undo", store.undo("r1")), as_("verdict", store.judge(
        "r2", second["assignment_id"], "tie", None, {}, None)), return_exceptions=True)
    async with log.engine.connect() as conn:
        rows = {r["reviewer"]: r for r in (await conn.execute(select(ReviewAssignment))).mappings()}
    if rows["r1"]["status"] == "shown":  # the undo went through: only before the other verdict
        assert rows["r2"]["status"] == "judged" and commits.index("undo") < commits.index("verdict"), (outcome,
                                                                                                       commits)
    else:
        assert isinstance(outcome[0], APIError) and outcome[0].status == 409


async def test_a_remote_revision_longer_than_the_log_keeps_is_not_recorded():
    """PostgreSQL refuses a row whose `model_revision` is over its column (SQLite takes it): the candidate's batch
    spilled and its row was set aside, so the item was reviewed as a single answer (found by a review)."""
    from types import SimpleNamespace

    from service.review.candidates import Candidates

    def remote(revision):
        async def listed():
            return SimpleNamespace(data=[SimpleNamespace(id="cand", revision=revision)])
        return SimpleNamespace(_remote=SimpleNamespace(models=SimpleNamespace(list=listed)))

    assert await Candidates._remote_revision(remote("sha256:" + "a" * 64), "cand") == "sha256:" + "a" * 64
    assert await Candidates._remote_revision(remote("r" * 81), "cand") is None
    assert await Candidates._remote_revision(remote(None), "cand") is None


async def test_statistics_are_recomputed_only_when_a_verdict_changed(tmp_path):
    """The page asks for them after every verdict, and computing them reads every verdict and answer so far."""
    log = await open_log(f"sqlite+aiosqlite:///{tmp_path / 'review.db'}", tmp_path)
    await seed(log, pair("i0", "Q0", "x", "y") + pair("i1", "Q1", "x", "z", minute=1))
    policy = ReviewPolicy(overlap=1, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store = ReviewStore(log.engine, policy, random.Random(7))
    reads = 0
    judgements = store.judgements

    async def counted(*args, **kwargs):
        nonlocal reads
        reads += 1
        return await judgements(*args, **kwargs)

    store.judgements = counted
    empty = await store.statistics()
    assert await store.statistics() is empty and reads == 1  # nothing changed: not read again
    first = await store.next_item("r1")
    assert await store.statistics() is empty and reads == 1  # shown is no verdict
    await store.judge("r1", first["assignment_id"], "tie", None, {}, None)
    judged = await store.statistics()
    assert reads == 2 and judged["labels"]["tie"] == 1
    await store.undo("r1")  # back to shown: one verdict fewer
    assert (await store.statistics())["labels"].get("tie", 0) == 0 and reads == 3
    await store.skip("r1", (await store.next_item("r1"))["assignment_id"])
    assert [r["skipped"] for r in (await store.statistics())["reviewers"]] == [1] and reads == 4
    assert await store.rekey({"r1": "r2"})  # reviewers renamed (keyed digests at start): no counts move
    assert await store.statistics() and reads == 5
    await log.close()


async def test_a_reviewer_is_never_given_their_own_chat(log):
    """A reviewer key may chat; its own chat, whose served answer that reviewer has seen, went into their queue, so
    the pair was not blind. Others still get it, and an open server's chats (no key) go to everyone."""
    own = "a" * 64
    rows = pair("mine", "Q0", "x", "y")
    rows[0]["api_key_hash"] = own
    await seed(log, [*rows, *pair("open", "Q1", "x", "y", minute=1)])
    policy = ReviewPolicy(overlap=2, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store = ReviewStore(log.engine, policy, random.Random(7))
    assert (await store.next_item(own))["item_id"] == "open"
    assert (await store.next_item("b" * 64))["item_id"] == "mine"


async def test_undo_takes_back_a_skip_while_the_item_has_room(log):
    """A stray `s` skipped an item for good (undo only took back verdicts, and took back the verdict before the
    skip). Undo now takes back whichever came last; a skip whose item others have filled since stands."""
    await seed(log, [*pair("i0", "Q0", "x", "y"), *pair("i1", "Q1", "x", "y", minute=1)])
    policy = ReviewPolicy(overlap=2, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store = ReviewStore(log.engine, policy, random.Random(7))
    first = await store.next_item("r1")
    await store.judge("r1", first["assignment_id"], "a", 2, {}, None)
    second = await store.next_item("r1")
    assert second["item_id"] == "i1"
    await store.skip("r1", second["assignment_id"])
    again = await store.undo("r1")
    assert again["item_id"] == "i1" and again["answers"] == second["answers"]
    assert await store.next_item("r1") == again
    await store.skip("r1", again["assignment_id"])
    for other in ("r2", "r3"):  # both take i0 first, then fill i1
        held = await store.next_item(other)
        await store.judge(other, held["assignment_id"], "b", 2, {}, None) if held["item_id"] == "i0" else None
    assert {(await store.next_item(o))["item_id"] for o in ("r2", "r3")} == {"i1"}
    with pytest.raises(Exception, match="your skip stands"):
        await store.undo("r1")  # i1 is full: the skip stands, and undo does not reach past it to the verdict
    assert (await store.next_item("r1")) is None


async def test_undo_gives_back_the_verdict_taken_back_and_reaches_no_further_than_its_window(log, monkeypatch):
    """Undo wiped the comment, flags and strength, which the page could not give back; and `z` pressed again and
    again walked back through every verdict the reviewer had given, exported ones included (overlap 1)."""
    from datetime import UTC, datetime

    from service.review import store as store_module

    await seed(log, [*pair("i0", "Q0", "x", "y"), *pair("i1", "Q1", "x", "y", minute=1)])
    policy = ReviewPolicy(overlap=1, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store = ReviewStore(log.engine, policy, random.Random(7))
    first = await store.next_item("r1")
    await store.judge("r1", first["assignment_id"], "b", 3, {"B": ["unsafe", "incorrect"]}, "  B made it up ")
    again = await store.undo("r1")
    assert again["assignment_id"] == first["assignment_id"] and "draft" not in first
    assert again["draft"] == {"verdict": "b", "strength": 3, "comment": "B made it up",
                              "flags": {"B": ["incorrect", "unsafe"]}}
    assert "draft" not in await store.next_item("r1")  # the item held, as a reload fetches it
    await store.judge("r1", again["assignment_id"], "tie", None, {}, None)

    later = datetime.now(UTC) + store_module.UNDO_WINDOW + timedelta(minutes=1)

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return later

    monkeypatch.setattr(store_module, "datetime", Later)
    with pytest.raises(Exception, match="more than 10 minutes ago, so it stands"):
        await store.undo("r1")
    monkeypatch.undo()
    assert (await store.judgements(texts=False))[0][0].label == "tie"


async def test_an_export_after_the_last_one_gets_verdicts_given_since_on_older_items(log):
    """`since` reads when an item was made: a verdict given today on last week's item was in no export after the
    last one. `judged_since` reads when verdicts were given, and brings each such item with all its verdicts."""
    from datetime import UTC, datetime

    from sqlalchemy import update

    from service.store.models import ReviewAssignment

    await seed(log, [*pair("old", "Q0", "x", "y"), *pair("new", "Q1", "x", "y", minute=1)])
    policy = ReviewPolicy(overlap=2, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))
    store = ReviewStore(log.engine, policy, random.Random(7))
    for reviewer in ("r1", "r2"):
        while (held := await store.next_item(reviewer)) is not None:
            await store.judge(reviewer, held["assignment_id"], "a", 1, {}, None)
    cutoff = datetime.now(UTC) - timedelta(hours=1)
    async with log.engine.begin() as conn:  # r1's verdicts were given two hours ago, r2's on "old" just now
        await conn.execute(update(ReviewAssignment).where(ReviewAssignment.reviewer == "r1")
                           .values(judged_at=cutoff - timedelta(hours=1)))
        await conn.execute(update(ReviewAssignment).where(ReviewAssignment.reviewer == "r2",
                                                          ReviewAssignment.item_id == "new")
                           .values(judged_at=cutoff - timedelta(hours=1)))
    created = T0 + timedelta(seconds=30)  # "old" was made at T0, "new" a minute later
    assert {j.item_id for j in (await store.judgements(created, texts=False))[0]} == {"new"}
    recent, _ = await store.judgements(judged_since=cutoff, texts=False)
    assert sorted((j.item_id, j.reviewer) for j in recent) == [("old", "r1"), ("old", "r2")]
