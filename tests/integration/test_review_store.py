"""The review queue, verdicts and export on both databases: SQLite and a real PostgreSQL."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from service.errors import APIError
from service.review import export
from service.review.store import ReviewPolicy, ReviewStore
from tests.review_data import T0, fresh_db_url, generation, open_log, pair, seed  # noqa: F401 (fixture)
from tests.unit.test_review_store_claims import candidate_comes_mid_claim, claims_at_once
from zephyr.pii import Redactor

pytestmark = pytest.mark.integration
POLICY = ReviewPolicy(overlap=2, lease=timedelta(minutes=30), candidate_wait=timedelta(minutes=10))


@pytest.fixture
async def log(fresh_db_url, tmp_path):  # noqa: F811
    log = await open_log(fresh_db_url, tmp_path)
    yield log
    await log.close()


def store_of(log, policy: ReviewPolicy = POLICY, seed_: int = 7) -> ReviewStore:
    return ReviewStore(log.engine, policy, random.Random(seed_))


async def test_overlap_never_twice_skip_and_undo(log):
    await seed(log, pair("i1", "Why is the sky blue?", "Rayleigh scattering.", "Because of the ocean.", minute=0)
               + pair("i2", "What is a cell?", "The unit of life.", None, minute=1))
    store = store_of(log)

    first = await store.next_item("r1")
    assert first["item_id"] == "i1" and first["kind"] == "pair"  # oldest first
    assert {a["text"] for a in first["answers"]} == {"Rayleigh scattering.", "Because of the ocean."}
    assert first["conversation"][-1] == {"role": "user", "content": "Why is the sky blue?"}
    assert await store.next_item("r1") == first  # unfinished work comes back, not a new item

    # Undo puts r1's verdict back and shows the same item, with the answers in the same order.
    await store.judge("r1", first["assignment_id"], "b", 2, {}, None)
    undone = await store.undo("r1")
    assert undone["item_id"] == "i1" and undone["answers"] == first["answers"]
    # the verdict taken back comes with the undo (to change, not redo), not with the item fetched again
    draft = undone.pop("draft")
    assert draft == {"verdict": "b", "strength": 2, "comment": None, "flags": {}}
    assert await store.next_item("r1") == undone
    with pytest.raises(APIError) as nothing:
        await store.undo("r5")
    assert nothing.value.status == 409

    await store.judge("r1", first["assignment_id"], "a", 3, {"B": ["incorrect"]}, "B is wrong")
    second = await store.next_item("r1")
    assert second["item_id"] == "i2" and second["kind"] == "single" and len(second["answers"]) == 1
    await store.skip("r1", second["assignment_id"])
    assert await store.next_item("r1") is None  # judged and skipped items are never shown to r1 again
    assert await store.progress("r1") == {"judged": 1, "waiting": 0}
    # ...unless the skip is undone while the item has room
    back = await store.undo("r1")
    assert back["item_id"] == "i2" and back["answers"] == second["answers"]
    await store.skip("r1", back["assignment_id"])

    # Overlap 2: r2 and r3 may both take i1; r4 finds it full while both hold it.
    held = await store.next_item("r2")
    assert held["item_id"] == "i1"
    r3_first = await store.next_item("r3")
    assert r3_first["item_id"] == "i2"  # r2 holds i1's second place
    r4 = await store.next_item("r4")
    assert r4["item_id"] == "i2"  # r1 skipped i2, so it still has one place after r3
    with pytest.raises(APIError, match="your skip stands") as stands:
        await store.undo("r1")  # r3 and r4 have filled i2 since
    assert stands.value.status == 409

    # Once another reviewer has judged the item too, a verdict stands: the statistics would show whether the two
    # agreed, and a verdict changed after that would follow the other reviewer, not the answers.
    await store.judge("r2", held["assignment_id"], "b", 2, {}, None)
    with pytest.raises(APIError, match="another reviewer has judged this item") as judged:
        await store.undo("r2")
    assert judged.value.status == 409


@pytest.mark.parametrize("overlap", [1, 2])
async def test_concurrent_reviewers_never_overfill_an_item(log, overlap):
    given = await claims_at_once(log, overlap, reviewers=4)
    assert given.count("i0") == overlap and given.count(None) == 4 - overlap


async def test_a_reviewer_who_loses_the_race_gets_the_next_item(log):
    assert sorted(await claims_at_once(log, 1, reviewers=3, items=3)) == ["i0", "i1", "i2"]


async def test_every_reviewer_of_an_item_sees_the_same_answers_when_its_candidate_comes_mid_claim(log):
    await candidate_comes_mid_claim(log)


async def test_a_verdict_and_a_skip_sent_at_once_keep_the_first_and_refuse_the_second(log, monkeypatch):
    """Enter then `s` before the save returns: both requests read the assignment as shown. The second must be a 409,
    not a skip written over the verdict (which the export would then never see)."""
    import asyncio

    await seed(log, pair("i1", "Q1", "x", "y"))
    store = store_of(log)
    mine = await store.next_item("r1")
    read = store._own_shown

    async def slow_read(conn, reviewer, assignment_id):  # both requests past the read before either writes
        row = await read(conn, reviewer, assignment_id)
        await asyncio.sleep(0.2)
        return row

    monkeypatch.setattr(store, "_own_shown", slow_read)
    outcomes = await asyncio.gather(store.judge("r1", mine["assignment_id"], "a", 2, {}, None),
                                    store.skip("r1", mine["assignment_id"]), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, APIError)]
    assert len(refused) == 1 and refused[0].status == 409, outcomes
    judged, _ = await store.judgements()
    assert len(judged) == (1 if outcomes[0] is None else 0)  # whichever came first stands, whole
    assert await store.progress("r1") == {"judged": len(judged), "waiting": 0}


async def test_an_item_shown_alone_stays_single_when_its_candidate_comes_late(log):
    """Past the candidate wait an item is shown alone; a candidate arriving after that must not make the next
    reviewer's view a pair, or the item's verdicts judge different things and its export is empty."""
    late = pair("i1", "Why is the sky blue?", "Rayleigh scattering.", "Because of the ocean.")
    served, candidate = late[0], late[1]
    await seed(log, [served])  # review_kind "pair", created long before now: past the wait
    store = store_of(log)
    first = await store.next_item("r1")
    assert first["kind"] == "single"
    await seed(log, [candidate])
    second = await store.next_item("r2")
    assert second["item_id"] == "i1" and second["kind"] == "single"
    for reviewer, view in (("r1", first), ("r2", second)):
        await store.judge(reviewer, view["assignment_id"], "good", None, {}, None)
    judged, generations = await store.judgements()
    _, count = export.to_jsonl(judged, generations, export.ExportOptions(format="kto"), None)
    assert count == 1  # the served answer, judged good by both


async def test_rekeying_keeps_one_assignment_per_item_for_a_reviewer_met_under_both_digests(log):
    """The server serves while re-keying runs beside its start, so a reviewer may meet items again under the new
    digest. Afterwards each item has one assignment for that person: a legacy verdict beats a new unfinished view,
    a new verdict beats the legacy row; and the re-keying does not fail on the one-per-reviewer rule."""
    await seed(log, pair("i1", "Q1", "x", "y") + pair("i2", "Q2", "z", "w", minute=1)
               + pair("i3", "Q3", "u", "v", minute=2))
    store = store_of(log, ReviewPolicy(overlap=3, lease=POLICY.lease, candidate_wait=POLICY.candidate_wait))
    for _ in range(2):  # i1 and i2 judged under the old digest
        view = await store.next_item("old")
        await store.judge("old", view["assignment_id"], "tie", None, {}, None)
    legacy_open = await store.next_item("old")  # i3 shown, not judged
    assert legacy_open["item_id"] == "i3"
    new_first = await store.next_item("new")  # i1 again: left unfinished
    assert new_first["item_id"] == "i1"
    await store.skip("new", new_first["assignment_id"])
    new_second = await store.next_item("new")  # i2 again: judged anew
    await store.judge("new", new_second["assignment_id"], "a", 1, {}, None)
    assert await store.rekey({"old": "new"}) == 2  # i1's legacy verdict and i3's legacy view move
    judged, _ = await store.judgements()
    labels = {j.item_id: j.label for j in judged}
    assert len(judged) == 2 and labels["i1"] == "tie" and labels["i2"] != "tie"  # one verdict an item: the kept ones
    assert (await store.next_item("new"))["item_id"] == "i3"  # the legacy view, now the reviewer's own
    assert await store.rekey({"old": "new"}) == 0


async def test_digests_of_keys_no_longer_configured_are_retired_once_keeping_each_reviewer_one(log):
    from sqlalchemy import select

    from service.store.models import Generation, ReviewAssignment

    plain = "a" * 64  # a plain SHA-256 an earlier version wrote for a key removed since
    await seed(log, pair("i1", "Q1", "x", "y") + pair("i2", "Q2", "z", "w", minute=1))
    store = store_of(log)
    for reviewer in (plain, "b" * 64):
        for _ in range(2):
            view = await store.next_item(reviewer)
            await store.judge(reviewer, view["assignment_id"], "tie", None, {}, None)
    async with log.engine.begin() as conn:
        await conn.execute(Generation.__table__.update().where(Generation.id == "i1").values(api_key_hash=plain))

    def retire(digest: str) -> str:
        return "r" + digest[1:]

    assert await store.retire_unknown_digests({"b" * 64}, retire) == 3  # two verdicts and one generation
    async with log.engine.connect() as conn:
        reviewers = [r for (r,) in await conn.execute(select(ReviewAssignment.reviewer))]
        keys = {k for (k,) in await conn.execute(select(Generation.api_key_hash))}
    assert sorted(set(reviewers)) == sorted({retire(plain), "b" * 64}) and len(reviewers) == 4
    assert plain not in keys and retire(plain) in keys
    judged, _ = await store.judgements()
    assert len({j.reviewer for j in judged}) == 2  # still two reviewers, each one person
    assert await store.retire_unknown_digests({"b" * 64}, lambda d: "s" + d[1:]) == 0  # once per database


async def test_verdicts_are_validated_and_owned(log):
    await seed(log, pair("i1", "Q1", "x", "y") + pair("i2", "Q2", "z", None, minute=1))
    store = store_of(log)
    mine = await store.next_item("r1")
    for args, status, param in [
        (("r2", mine["assignment_id"], "a", 2, {}, None), 404, "assignment_id"),  # someone else's
        (("r1", mine["assignment_id"], "good", None, {}, None), 400, "verdict"),  # single verdict on a pair
        (("r1", mine["assignment_id"], "a", None, {}, None), 400, "strength"),  # preference needs strength
        (("r1", mine["assignment_id"], "tie", 2, {}, None), 400, "strength"),
        (("r1", mine["assignment_id"], "tie", None, {"A": ["rude"]}, None), 400, "flags"),
    ]:
        with pytest.raises(APIError) as error:
            await store.judge(*args)
        assert (error.value.status, error.value.param) == (status, param), args
    await store.judge("r1", mine["assignment_id"], "tie", None, {}, None)
    with pytest.raises(APIError) as twice:
        await store.judge("r1", mine["assignment_id"], "a", 1, {}, None)
    assert twice.value.status == 409
    single = await store.next_item("r1")
    with pytest.raises(APIError) as no_b:
        await store.judge("r1", single["assignment_id"], "good", None, {"B": ["unsafe"]}, None)
    assert no_b.value.param == "flags"


async def test_verdicts_mean_the_same_whatever_the_screen_order(log):
    await seed(log, pair("i1", "Q", "served answer", "candidate answer"))
    labels = []
    # Seeds 1-4 draw 0.13, 0.96, 0.24, 0.24: the answers are swapped for r1, r3, r4 and not for r2.
    for seed_, reviewer in enumerate(("r1", "r2", "r3", "r4"), start=1):
        store = store_of(log, ReviewPolicy(4, POLICY.lease, POLICY.candidate_wait), seed_=seed_)
        view = await store.next_item(reviewer)
        letter = "a" if view["answers"][0]["text"] == "candidate answer" else "b"
        await store.judge(reviewer, view["assignment_id"], letter, 2, {letter.upper(): ["gives_answer"]}, None)
        labels.append(view["answers"][0]["text"])
    assert set(labels) == {"served answer", "candidate answer"}  # both orders were shown
    judgements, _ = await store.judgements()
    assert [j.label for j in judgements] == ["candidate"] * 4
    assert (await store.judgements(texts=False))[0] == judgements  # statistics' lighter read, the same verdicts
    assert all(j.flags == {"candidate": ["gives_answer"]} for j in judgements)
    assert {j.chose_left for j in judgements} == {True, False}


async def test_pairs_wait_for_their_candidate_then_fall_back_to_single(log):
    now = datetime.now(UTC)
    messages = [{"role": "user", "content": "Q"}]
    await seed(log, [
        generation("waiting", messages, "a1", created_at=now, review_kind="pair"),
        generation("late", messages, "a2", created_at=now - timedelta(minutes=11), review_kind="pair"),
        generation("failed", messages, "a3", created_at=now, review_kind="pair"),
        generation("failed-cand", messages, "", created_at=now, purpose="candidate", parent_id="failed",
                   status="error"),
        generation("aborted", messages, "a4", created_at=now, review_kind="pair", status="aborted"),
        generation("not-sampled", messages, "a5", created_at=now),
    ])
    store = store_of(log)
    shown = []
    while (view := await store.next_item("r1")) is not None:
        shown.append((view["item_id"], view["kind"]))
        await store.skip("r1", view["assignment_id"])
    assert shown == [("late", "single"), ("failed", "single")]


async def test_an_expired_lease_frees_the_place(log):
    await seed(log, pair("i1", "Q", "x", "y"))
    store = store_of(log, ReviewPolicy(overlap=1, lease=timedelta(seconds=0.2), candidate_wait=POLICY.candidate_wait))
    assert (await store.next_item("r1"))["item_id"] == "i1"
    assert await store.next_item("r2") is None
    import asyncio

    await asyncio.sleep(0.3)
    assert (await store.next_item("r2"))["item_id"] == "i1"


async def test_export_formats_agreement_dedup_pii_and_reproducibility(log, tmp_path):
    email = "Write to kim@school.org"
    rows = (pair("i1", "Why is the sky blue?", "Rayleigh scattering.", "Because of the ocean.", minute=0)
            + pair("i2", "What is a cell?", "The unit of life.", "A room.", minute=1)
            + pair("i3", "What is DNA?", "A molecule.", "A molecule.", minute=2)  # tie
            + pair("i4", "What is 2+2?", "5", "22", minute=3)  # both bad
            + pair("i5", "Name a noble gas.", "Neon.", None, minute=4)  # single, good
            + pair("i6", "Why is the sky blue?", "Rayleigh scattering.", "Because of the ocean.", minute=5)  # dup
            + pair("i7", "Boil water?", f"100 C. {email}", None, minute=6))  # single, good, raw PII in the DB
    await seed(log, rows)
    store = store_of(log, ReviewPolicy(3, POLICY.lease, POLICY.candidate_wait))

    async def judge(reviewer: str, choices: dict[str, tuple]) -> None:
        while (view := await store.next_item(reviewer)) is not None:
            choice = choices.get(view["item_id"])
            if choice is None:
                await store.skip(reviewer, view["assignment_id"])
                continue
            verdict, flags = choice
            if verdict in ("served", "candidate"):
                texts = [a["text"] for a in view["answers"]]
                target = {r["id"]: r for r in rows}[view["item_id"] if verdict == "served" else view["item_id"]
                                                    + "-cand"]["response"][0]["content"]
                letter = "ab"[texts.index(target)]
                await store.judge(reviewer, view["assignment_id"], letter, 3, flags, None)
            else:
                await store.judge(reviewer, view["assignment_id"], verdict, None, flags, None)

    await judge("r1", {"i1": ("served", {}), "i2": ("served", {}), "i3": ("tie", {}), "i4": ("both_bad", {}),
                       "i5": ("good", {}), "i6": ("served", {}), "i7": ("good", {})})
    await judge("r2", {"i1": ("served", {}), "i2": ("candidate", {}), "i4": ("both_bad", {}),
                       "i6": ("served", {})})
    await judge("r3", {"i2": ("served", {"B": ["unsafe"], "A": ["incorrect"]})})

    judgements, generations = await store.judgements()
    redactor = Redactor(["EMAIL_ADDRESS"], r"\b[A-Z]{1,3}\d{6,9}\b")

    def run(fmt: str, **options) -> list[dict]:
        text, count = export.to_jsonl(judgements, generations, export.ExportOptions(fmt, **options), redactor)
        lines = [json.loads(line) for line in text.splitlines()]
        assert len(lines) == count
        return lines

    # i2's answers were both flagged incorrect or unsafe by r3: a dpo export leaves the pair out unless asked.
    assert [r["meta"]["item_ids"] for r in run("dpo")] == [["i1", "i6"]]
    dpo = run("dpo", include_flagged=True)
    # i1 and i6 are the same pair: one record, both item ids. i2: served by 2 of 3. i3 tie, i4 both bad: none.
    assert [(r["meta"]["item_ids"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in dpo] == [
        (["i1", "i6"], "Rayleigh scattering.", "Because of the ocean."),
        (["i2"], "The unit of life.", "A room."),
    ]
    assert dpo[0]["prompt"] == [{"role": "system", "content": "You are a tutor."},
                                {"role": "user", "content": "Why is the sky blue?"}]
    assert dpo[0]["source"] == "zephyr-review"
    assert dpo[1]["meta"] | {"created_at": None} == {
        "item_ids": ["i2"], "label": "served", "reviewers": 3, "agreement": 0.6667, "strength": 3.0,
        "chosen_id": "i2", "rejected_id": "i2-cand", "chosen_model": "tutor", "rejected_model": "tutor [T=1]",
        "created_at": None,
        "kept": {"flagged": True, "unfinished": False, "min_agreement": 0.0, "min_reviewers": 1},
        "whole": True, "chosen_flagged": True}  # r3 flagged both answers incorrect or unsafe: kept by asking only
    assert [r["meta"]["item_ids"] for r in run("dpo", min_agreement=0.9)] == [["i1", "i6"]]
    assert [r["meta"]["item_ids"] for r in run("dpo", min_reviewers=3, include_flagged=True)] == [["i2"]]

    kto = run("kto")
    assert [(r["meta"]["item_ids"][0], r["completion"][0]["content"], r["label"]) for r in kto] == [
        ("i1", "Rayleigh scattering.", True), ("i1", "Because of the ocean.", False),
        # i2's winner was flagged incorrect by a reviewer: never a desirable example
        ("i2", "A room.", False),
        ("i4", "5", False), ("i4", "22", False),
        ("i5", "Neon.", True),
        ("i7", "100 C. Write to <EMAIL_ADDRESS>", True),
    ]
    sft = run("sft")
    assert [r["messages"][-1]["content"] for r in sft] == ["Rayleigh scattering.", "Neon.",
                                                            "100 C. Write to <EMAIL_ADDRESS>"]
    assert all("kim@school.org" not in json.dumps(r) for r in dpo + kto + sft)

    again, _ = export.to_jsonl(*(await store.judgements()), export.ExportOptions("kto"), redactor)
    first, _ = export.to_jsonl(judgements, generations, export.ExportOptions("kto"), redactor)
    assert again == first  # same database, same file
    since, _ = await store.judgements(T0 + timedelta(minutes=4))
    assert {j.item_id for j in since} == {"i5", "i6", "i7"}


async def test_migration_0002_keeps_existing_rows(fresh_db_url):  # noqa: F811
    from sqlalchemy import text

    from service.store.log import make_engine, upgrade_schema

    engine = make_engine(fresh_db_url)
    await upgrade_schema(engine, "0001")
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO generations (id, created_at, route, model, status, messages, response, params, "
            "prompt_tokens, completion_tokens, latency_ms, review_requested) VALUES ('old', :at, 'chat', 'm', "
            "'ok', '[]', '[]', '{}', 1, 1, 1.0, false)"), {"at": T0})
    await upgrade_schema(engine)
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT purpose, parent_id, review_kind FROM generations"))).one()
    assert tuple(row) == ("served", None, None)
    await engine.dispose()
