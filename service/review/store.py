"""The review queue and verdicts, in the generation log's database.

A review item is a served chat the sampler picked (`generations.review_kind`); its candidate is the
generation whose `parent_id` names it. Each reviewer's view of an item is one `review_assignments` row: made
when the item is shown (answers in a random order), then judged, skipped, or put back by undo."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import aliased

from service.errors import APIError
from service.review import stats
from service.review.stats import FLAGS, Judgement, reviewer_label
from service.store.models import Generation, ReviewAssignment, ReviewSession, StoreState
from zephyr import textquality
from zephyr.clock import utc

PAIR_VERDICTS = ("a", "b", "tie", "both_bad")
SINGLE_VERDICTS = ("good", "bad")
CLAIM_ATTEMPTS = 20


@dataclass(frozen=True)
class ReviewPolicy:
    overlap: int
    lease: timedelta
    candidate_wait: timedelta


# How long a verdict or skip can be taken back: a stray `z` pressed again and again walked back through every verdict
# the reviewer ever gave, exported ones included (with an overlap of 1 no other verdict holds them).
UNDO_WINDOW = timedelta(minutes=10)

RETIRED_DIGESTS = "retired_unknown_key_digests"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")  # a key's digest, plain SHA-256 or keyed


class ReviewStore:
    def __init__(self, engine: AsyncEngine, policy: ReviewPolicy, rng: random.Random | None = None,
                 names: Mapping[str, str] | None = None):
        self.engine = engine
        self.policy = policy
        self._random = rng or random.Random()
        self.names = names or {}  # key digest -> reviewer name (KeyRing.names)
        self._statistics: tuple[tuple, dict[str, Any]] | None = None  # (the verdicts' version, statistics)

    # Sign-in sessions (service.auth.Sessions) --------------------------------------------------------------

    async def create_session(self, session_digest: str, reviewer: str, expires_at: datetime) -> None:
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            await conn.execute(delete(ReviewSession).where(ReviewSession.expires_at <= now))
            await conn.execute(ReviewSession.__table__.insert().values(
                id=session_digest, reviewer=reviewer, created_at=now, expires_at=expires_at))

    async def session_reviewer(self, session_digest: str, now: datetime) -> str | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(ReviewSession.reviewer, ReviewSession.expires_at)
                                      .where(ReviewSession.id == session_digest))).first()
        return row.reviewer if row is not None and utc(row.expires_at) > now else None

    async def delete_session(self, session_digest: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(ReviewSession).where(ReviewSession.id == session_digest))

    async def rekey(self, digests: dict[str, str]) -> int:
        """Rows written before keyed digests hold a key's plain SHA-256; `digests` maps each configured key's old
        digest to its keyed one. Returns the rows changed; a start that finds nothing left changes none.

        The server serves while this runs, so a reviewer may meet an item again under the new digest; one person
        keeps one assignment per item: an unfinished new one gives way to the legacy one, else the new verdict
        stands and the legacy row goes."""
        A, other = ReviewAssignment, aliased(ReviewAssignment)
        changed = 0
        async with self.engine.begin() as conn:
            for old, new in digests.items():
                result = await conn.execute(update(Generation).where(Generation.api_key_hash == old)
                                            .values(api_key_hash=new))
                changed += result.rowcount or 0
                legacy_twin = exists().where(other.item_id == A.item_id, other.reviewer == old)
                await conn.execute(delete(A).where(A.reviewer == new, A.status != "judged", legacy_twin))
                judged_twin = exists().where(other.item_id == A.item_id, other.reviewer == new)
                await conn.execute(delete(A).where(A.reviewer == old, judged_twin))
                result = await conn.execute(update(A).where(A.reviewer == old).values(reviewer=new))
                changed += result.rowcount or 0
        if changed:
            self._statistics = None  # reviewers renamed: cached statistics name them by their old digests
        return changed

    async def retire_unknown_digests(self, known: set[str], retire: Callable[[str], str]) -> int:
        """Once per database: every key digest in it that is no configured key's (`known`) is replaced by
        `retire(digest)`, a keyed digest of it. Keys removed before the re-keying above existed left plain SHA-256
        digests that no later start could map; a weak or reused key could be guessed back from one. Each value
        keeps one replacement, so a retired key's rows stay one reviewer or client. Its sign-ins end. Returns the
        rows changed; the fact that it ran is kept in store_state, so keyed digests of keys removed later are
        never re-keyed again."""
        A, G, S = ReviewAssignment, Generation, ReviewSession
        changed = 0
        async with self.engine.begin() as conn:
            if (await conn.execute(select(StoreState.name).where(StoreState.name == RETIRED_DIGESTS))).first():
                return 0
            found = set()
            for column in (G.api_key_hash, A.reviewer, S.reviewer):
                found |= set((await conn.execute(select(column).distinct())).scalars())
            retired = {old: retire(old) for old in found if old and _DIGEST.match(old) and old not in known}
            for old, new in retired.items():
                changed += (await conn.execute(update(G).where(G.api_key_hash == old)
                                               .values(api_key_hash=new))).rowcount or 0
                changed += (await conn.execute(update(A).where(A.reviewer == old).values(reviewer=new))).rowcount or 0
                await conn.execute(delete(S).where(S.reviewer == old))
            # Two replicas starting at once: the second's insert fails and its transaction changes nothing.
            await conn.execute(StoreState.__table__.insert().values(
                name=RETIRED_DIGESTS, value=f"{len(retired)} digests", set_at=datetime.now(UTC)))
        if changed:
            self._statistics = None  # as after rekey
        return changed

    # Queue ----------------------------------------------------------------------------------------------

    def _available(self, reviewer: str, now: datetime):
        """Items this reviewer has never been shown that still need verdicts, oldest first."""
        return select(Generation).where(*self._open_to(reviewer, now))

    def _holders(self, item_id: Any, now: datetime, besides: str | None = None) -> Any:
        """How many reviewers hold an item now (a verdict, or a lease still running), `besides` one not counted:
        a count the statement it sits in reads for each item (`item_id` a column of it)."""
        B = aliased(ReviewAssignment)  # its own alias: the statement around it may read assignments too
        return select(func.count()).select_from(B).where(
            B.item_id == item_id, *([B.reviewer != besides] if besides is not None else []),
            or_(B.status == "judged", and_(B.status == "shown", B.shown_at > now - self.policy.lease)),
        ).scalar_subquery()

    def _open_to(self, reviewer: str, now: datetime) -> list:
        """The conditions on a generation (`Generation`) that make it an item this reviewer may be given now."""
        G, A, C = Generation, ReviewAssignment, aliased(Generation)
        held = self._holders(G.id, now)
        seen = exists().where(A.item_id == G.id, A.reviewer == reviewer)
        candidate_done = exists().where(C.parent_id == G.id)
        return [
            G.review_kind.is_not(None), G.purpose == "served", G.status == "ok", ~seen,
            # not the reviewer's own chat: they saw its served answer, so a pair would not be blind
            or_(G.api_key_hash.is_(None), G.api_key_hash != reviewer),
            # one answer an item: a chat with n > 1 logged for review before that rule is not shown
            func.coalesce(G.params["n"].as_integer(), 1) == 1,
            held < self.policy.overlap,
            or_(G.review_kind == "single", candidate_done, G.created_at < now - self.policy.candidate_wait),
        ]

    async def next_item(self, reviewer: str) -> dict[str, Any] | None:
        """The reviewer's unfinished item if any, else a new one from the queue, else None."""
        # A lost race for an item (other reviewers, two tabs) is retried with the next one; everyone reads the same
        # oldest item, so each round one of those asking at once wins: enough rounds for a team asking together.
        for _ in range(CLAIM_ATTEMPTS):
            async with self.engine.begin() as conn:
                current = await self._current(conn, reviewer)
                if current is not None:
                    return await self._view(conn, current)
                now = datetime.now(UTC)
                item = (await conn.execute(
                    self._available(reviewer, now).order_by(Generation.created_at, Generation.id).limit(1)
                )).mappings().first()
                if item is None:
                    return None
                left, right = item["id"], await self._shown_candidate(conn, item["id"])
                if right is not None and self._random.random() < 0.5:
                    left, right = right, left
            try:
                if await self._claim(reviewer, item["id"], now, left, right):
                    break
            except IntegrityError:  # this reviewer took it in another tab meanwhile: read back below
                break
            # else others filled its places since it was read: the next one
        # What the reviewer holds now (the item just claimed, or one another tab claimed), read back as at the top.
        async with self.engine.begin() as conn:
            current = await self._current(conn, reviewer)
            return await self._view(conn, current) if current is not None else None

    async def _claim(self, reviewer: str, item_id: str, now: datetime, left: str, right: str | None) -> bool:
        """Assigns the item to the reviewer if it is still open to them, in one transaction that no other claim
        of the item can interleave with: the item is read free (fewer than `overlap` holders) and the assignment
        written by one INSERT ... SELECT. On SQLite that statement holds the database's write lock from its
        read to its write; on PostgreSQL, whose READ COMMITTED statements see only what was committed when they
        began, the item's row is locked first (FOR UPDATE), so a second claim waits for the first to commit and
        then counts its holder. Returns whether the assignment was made."""
        G, A, shown, earlier = Generation, ReviewAssignment, aliased(ReviewAssignment), aliased(ReviewAssignment)
        # Every reviewer of an item sees the answers its first assignment showed (_shown_candidate): a claim read
        # before that assignment (alone, its candidate late) must not be written after it showed the candidate, nor
        # the reverse. Against the first only, so an item mixed before this rule still has a view that is taken.
        candidate = next((gid for gid in (left, right) if gid is not None and gid != item_id), None)
        first = select(func.min(earlier.id)).where(earlier.item_id == G.id).correlate(G).scalar_subquery()
        same_answers = ~exists().where(shown.id == first, shown.right_id.is_not(None) if candidate is None else
                                       or_(shown.right_id.is_(None), and_(shown.left_id != candidate,
                                                                          shown.right_id != candidate)))
        async with self.engine.begin() as conn:
            if not await self._lock_item(conn, item_id):
                return False
            row = {"reviewer": reviewer, "status": "shown", "shown_at": now, "left_id": left, "right_id": right,
                   "flags": {}}
            columns = A.__table__.c
            values = select(G.id, *(literal(value, columns[name].type) for name, value in row.items())).where(
                G.id == item_id, same_answers, *self._open_to(reviewer, now))
            result = await conn.execute(insert(A).from_select(["item_id", *row], values))
            return result.rowcount == 1

    async def _current(self, conn, reviewer: str):
        A = ReviewAssignment
        return (await conn.execute(
            select(A).where(A.reviewer == reviewer, A.status == "shown").order_by(A.shown_at.desc(), A.id.desc())
            .limit(1)
        )).mappings().first()

    async def _shown_candidate(self, conn, item_id: str) -> str | None:
        """The candidate every reviewer of this item sees: the one its first assignment showed (an item shown alone
        once its candidate was late is not made a pair later, which would leave its verdicts judging different
        things: export and win rates read them as one), else the candidate that has come, if any."""
        A = ReviewAssignment
        first = (await conn.execute(
            select(A.left_id, A.right_id).where(A.item_id == item_id).order_by(A.id).limit(1))).first()
        if first is not None:
            return next((gid for gid in first if gid is not None and gid != item_id), None)
        return await self._candidate_id(conn, item_id)

    async def _candidate_id(self, conn, item_id: str) -> str | None:
        G = Generation
        return (await conn.execute(
            select(G.id).where(G.parent_id == item_id, G.purpose == "candidate", G.status == "ok")
            .order_by(G.created_at, G.id).limit(1)
        )).scalar_one_or_none()

    async def _view(self, conn, assignment) -> dict[str, Any]:
        ids = [assignment["left_id"]] + ([assignment["right_id"]] if assignment["right_id"] else [])
        rows = {r["id"]: r for r in (await conn.execute(select(Generation).where(Generation.id.in_(ids))))
                .mappings()}
        item = rows[assignment["item_id"]]
        return {
            "assignment_id": assignment["id"],
            "item_id": item["id"],
            "kind": "pair" if assignment["right_id"] else "single",
            "conversation": item["messages"],
            "answers": [{"label": label, **answer_facts(rows[gid])} for label, gid in zip("AB", ids, strict=False)],
            "created_at": utc(item["created_at"]).isoformat(),
        }

    async def progress(self, reviewer: str) -> dict[str, int]:
        A = ReviewAssignment
        async with self.engine.connect() as conn:
            judged = (await conn.execute(
                select(func.count()).select_from(A).where(A.reviewer == reviewer, A.status == "judged")
            )).scalar_one()
            waiting = (await conn.execute(
                select(func.count()).select_from(self._available(reviewer, datetime.now(UTC)).subquery())
            )).scalar_one()
        return {"judged": judged, "waiting": waiting}

    # Verdicts -------------------------------------------------------------------------------------------

    async def _own_shown(self, conn, reviewer: str, assignment_id: int):
        A = ReviewAssignment
        row = (await conn.execute(select(A).where(A.id == assignment_id, A.reviewer == reviewer))).mappings().first()
        if row is None:
            raise APIError(404, f"assignment {assignment_id} is not one of yours; fetch GET /review/api/next",
                           param="assignment_id", code="not_found")
        if row["status"] != "shown":
            raise APIError(409, f"assignment {assignment_id} is already {row['status']}; undo it first to change it",
                           param="assignment_id", code="conflict")
        return row

    async def judge(self, reviewer: str, assignment_id: int, verdict: str, strength: int | None,
                    flags: dict[str, list[str]], comment: str | None) -> None:
        async with self.engine.begin() as conn:
            row = await self._own_shown(conn, reviewer, assignment_id)
            await self._lock_item(conn, row["item_id"])  # against an undo of another's verdict on it (undo)
            pair = row["right_id"] is not None
            allowed = PAIR_VERDICTS if pair else SINGLE_VERDICTS
            if verdict not in allowed:
                raise APIError(400, f"verdict `{verdict}` does not fit a {'pair' if pair else 'single answer'}; "
                                    f"use one of {', '.join(allowed)}", param="verdict")
            prefers = verdict in ("a", "b")
            if prefers and strength is None:
                raise APIError(400, "a preference needs `strength` from 1 (slightly better) to 4 (far better)",
                               param="strength")
            if not prefers and strength is not None:
                raise APIError(400, f"`strength` applies to a / b verdicts only; leave it out for `{verdict}`",
                               param="strength")
            by_answer = {"A": row["left_id"], "B": row["right_id"]}
            stored_flags = {}
            for label, names in flags.items():
                if label not in by_answer or by_answer[label] is None:
                    raise APIError(400, f"flags name answer `{label}`; this item has answers "
                                        f"{'A and B' if pair else 'A'}", param="flags")
                unknown = set(names) - set(FLAGS)
                if unknown:
                    raise APIError(400, f"unknown flag {sorted(unknown)[0]!r}; flags are {', '.join(FLAGS)}",
                                   param="flags")
                if names:
                    stored_flags[by_answer[label]] = sorted(set(names))
            await self._settle(conn, assignment_id, "shown", status="judged", verdict=verdict, strength=strength,
                               flags=stored_flags, comment=(comment or "").strip() or None,
                               judged_at=datetime.now(UTC),
                               chosen_id={"a": row["left_id"], "b": row["right_id"]}.get(verdict))

    async def skip(self, reviewer: str, assignment_id: int) -> None:
        async with self.engine.begin() as conn:
            await self._own_shown(conn, reviewer, assignment_id)
            # judged_at keeps when it was settled, a skip as a verdict: undo takes back whichever came last
            await self._settle(conn, assignment_id, "shown", status="skipped", judged_at=datetime.now(UTC))

    @staticmethod
    async def _lock_item(conn, item_id: str) -> bool:
        """Holds the item's row until the transaction ends, on PostgreSQL (SQLite has one writer at a time);
        whether the item is there."""
        if conn.dialect.name == "sqlite":
            return True
        return (await conn.execute(select(Generation.id).where(Generation.id == item_id).with_for_update())
                ).first() is not None

    @staticmethod
    async def _settle(conn, assignment_id: int, expected: str, *conditions: Any, conflict: str | None = None,
                      **values: Any) -> None:
        """Moves the assignment on only if it is still `expected` (and `conditions` hold, in the same statement):
        the status read before may have changed since (a verdict and a skip, or two verdicts, sent at once), and
        the second must not overwrite the first. `conflict`: the 409's message when it does not move."""
        A = ReviewAssignment
        moved = await conn.execute(
            update(A).where(A.id == assignment_id, A.status == expected, *conditions).values(**values))
        if moved.rowcount != 1:
            raise APIError(409, conflict or f"assignment {assignment_id} changed while this request was made "
                                "(another verdict, skip or undo); fetch GET /review/api/next",
                           param=None if conflict else "assignment_id", code="conflict")

    async def undo(self, reviewer: str) -> dict[str, Any]:
        """Takes back the reviewer's latest verdict or skip (a stray key skipped an item for good, and undo then
        took back the verdict before it); that item is shown again (same answer order), with the verdict taken
        back as its `draft` (verdict, strength, flags by answer label, comment) to change rather than redo. A skip
        whose item others have filled since stands (there is no place left to show it in), and so does all before
        it; so does all given more than UNDO_WINDOW ago."""
        A, B = ReviewAssignment, aliased(ReviewAssignment)
        now = datetime.now(UTC)

        async with self.engine.begin() as conn:
            last = (await conn.execute(
                select(A).where(A.reviewer == reviewer, A.status.in_(("judged", "skipped")))
                .order_by(A.judged_at.desc().nulls_last(), A.id.desc()).limit(1)
            )).mappings().first()
            if last is None:
                raise APIError(409, "you have no verdict or skip to undo", code="conflict")
            minutes = int(UNDO_WINDOW.total_seconds() // 60)
            # (a skip from before skips were timed has no time: older than any window)
            if last["judged_at"] is None or utc(last["judged_at"]) < now - UNDO_WINDOW:
                raise APIError(409, f"your last verdict or skip was given more than {minutes} minutes ago, so it "
                                    "stands; say what you would change in a comment on your next verdict",
                               code="conflict")
            if last["status"] == "skipped":  # no verdict, so nobody's agreement to keep
                await self._lock_item(conn, last["item_id"])  # as a claim does: no overlap + 1 holders
                # room beside: fewer other reviewers hold the item than the overlap asks
                await self._settle(conn, last["id"], "skipped",
                                   self._holders(last["item_id"], now, besides=reviewer) < self.policy.overlap,
                                   conflict="other reviewers have taken the item you skipped last since, so your skip "
                                            "stands (undo goes no further back)",
                                   status="shown", judged_at=None, shown_at=now)
                current = (await conn.execute(select(A).where(A.id == last["id"]))).mappings().one()
                return await self._view(conn, current)
            # Once another reviewer has judged the item, the statistics can show whether the two agreed: a verdict
            # changed after that would be judged by agreement, not by the answers. It stands. Checked in the update
            # itself (SQLite reads outside the write), under the item's lock a verdict also takes (PostgreSQL).
            await self._lock_item(conn, last["item_id"])
            others_judged = exists().where(B.item_id == last["item_id"], B.reviewer != reviewer, B.status == "judged")
            await self._settle(conn, last["id"], "judged", ~others_judged,
                               conflict="another reviewer has judged this item too, so your verdict on it stands; "
                                        "say what you would change in a comment on your next verdict",
                               status="shown", verdict=None, chosen_id=None, strength=None, flags={}, comment=None,
                               judged_at=None, shown_at=now)
            current = (await conn.execute(select(A).where(A.id == last["id"]))).mappings().one()
            return {**await self._view(conn, current), "draft": _draft_of(last)}

    # Reading for statistics and export ------------------------------------------------------------------

    async def judgements(self, since: datetime | None = None, *, judged_since: datetime | None = None,
                         texts: bool = True) -> tuple[list[Judgement], dict[str, dict]]:
        """Every judged verdict in order-free terms, and the generations they are about (by id). `since`: items
        created then or later; `judged_since`: items with a verdict given then or later, with all their verdicts (an
        export after the last one: `since` missed every verdict given later on an older item). `texts=False` reads
        of those only what statistics need (model, sampling, and the answers: a pair of one text is no contest),
        not the conversations: the page asks for statistics after every verdict."""
        A, G = ReviewAssignment, Generation
        columns = (G,) if texts else (G.id, G.model, G.params, G.response)
        async with self.engine.connect() as conn:
            query = select(A).where(A.status == "judged")
            if since is not None:
                query = query.where(A.item_id.in_(select(G.id).where(G.created_at >= since)))
            if judged_since is not None:
                B = aliased(ReviewAssignment)
                query = query.where(A.item_id.in_(select(B.item_id).where(B.status == "judged",
                                                                          B.judged_at >= judged_since)))
            verdicts = (await conn.execute(query.order_by(A.item_id, A.id))).mappings().all()
            ids = {v["item_id"] for v in verdicts} | {v["left_id"] for v in verdicts} | {
                v["right_id"] for v in verdicts if v["right_id"]}
            generations = {}
            id_list = sorted(ids)
            for start in range(0, len(id_list), 500):
                chunk = id_list[start : start + 500]
                for row in (await conn.execute(select(*columns).where(G.id.in_(chunk)))).mappings():
                    generations[row["id"]] = dict(row)
        # Off the event loop: one verdict after another, the page asks for these after each.
        judged = await asyncio.to_thread(lambda: [to_judgement(v, generations, self.names) for v in verdicts])
        return judged, generations

    async def statistics(self) -> dict[str, Any]:
        """stats.compute over every verdict, as GET /review/stats serves it. The page asks after each verdict, and
        computing it reads every verdict and answer so far: it is recomputed only when the verdicts changed (their
        count, newest id and newest time: a judgement, an undo or a skip moves one; rekey and retire_unknown_digests,
        which rename reviewers, drop it), else this process's last one."""
        A = ReviewAssignment
        async with self.engine.connect() as conn:
            version = tuple((await conn.execute(select(func.count(), func.max(A.id), func.max(A.judged_at))
                                                .where(A.status == "judged"))).one())
        skipped = await self.skipped()
        key = (*version, tuple(sorted(skipped.items())))
        if self._statistics is not None and self._statistics[0] == key:
            return self._statistics[1]
        judgements, _generations = await self.judgements(texts=False)
        # CPU work that grows with the history: off the event loop that streams students' answers
        result = await asyncio.to_thread(stats.compute, judgements, skipped, self.policy.overlap)
        self._statistics = (key, result)
        return result

    async def skipped(self) -> dict[str, int]:
        A = ReviewAssignment
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(A.reviewer, func.count()).where(A.status == "skipped")
                                      .group_by(A.reviewer))
            return {reviewer_label(reviewer, self.names): count for reviewer, count in rows}


def answer_text(row: dict[str, Any]) -> str:
    return row["response"][0]["content"] if row["response"] else ""


def answer_facts(row: dict[str, Any]) -> dict[str, Any]:
    """An answer as the reviewer sees it: its text, and whether it ended on its own (`stop`), was cut off at
    max_tokens (`length`) or was the safety guard's reply (`content_filter`), with its length, and whether it loops
    (judged here for rows logged before the log kept it). Nothing that tells which model wrote it."""
    choice = row["response"][0] if row["response"] else {}
    return {
        "text": answer_text(row),
        "finish_reason": choice.get("finish_reason"),
        # The row counts the tokens of all its choices; a review item is one answer (n=1).
        "tokens": row["completion_tokens"] if len(row["response"] or []) == 1 else None,
        "max_tokens": (row.get("params") or {}).get("max_tokens"),
        "looping": choice["looping"] if "looping" in choice else textquality.loops(answer_text(row)),
        # The safety guard's verdict when it answered instead of the model (zephyr/safety.py): a reviewer judges
        # whether refusing was right.
        "safety": (row.get("params") or {}).get("safety"),
        # Its verdict on the model's own answer when it stopped it at a sentence (service/answer_screen.py): the
        # sentence withheld, which the answer's text no longer holds.
        "answer_safety": ((row.get("params") or {}).get("answer_safety") or {}).get("0"),
    }


def model_label(row: dict[str, Any], served_model: str) -> str:
    """A candidate from the served model itself is told apart by how it was sampled, e.g. `m [T=1]`."""
    variant = (row.get("params") or {}).get("variant")
    if row["model"] == served_model and variant:
        return f"{row['model']} [{variant}]"
    return row["model"]


def _draft_of(verdict: Mapping[str, Any]) -> dict[str, Any]:
    """A verdict taken back, as the page fills its form: flags by answer label, not by generation id."""
    label_of = {verdict["left_id"]: "A", verdict["right_id"]: "B"}
    return {"verdict": verdict["verdict"], "strength": verdict["strength"], "comment": verdict["comment"],
            "flags": {label_of[gid]: names for gid, names in (verdict["flags"] or {}).items() if gid in label_of}}


def to_judgement(v: dict[str, Any], generations: dict[str, dict], names: Mapping[str, str] | None = None) -> Judgement:
    item = generations[v["item_id"]]
    pair = v["right_id"] is not None
    candidate_id = None
    if pair:
        candidate_id = v["right_id"] if v["left_id"] == v["item_id"] else v["left_id"]
    if v["verdict"] in ("a", "b"):
        label = "served" if v["chosen_id"] == v["item_id"] else "candidate"
        chose_left = v["chosen_id"] == v["left_id"]
    else:
        label, chose_left = v["verdict"], None
    role_of = {v["item_id"]: "served", candidate_id: "candidate"}
    return Judgement(
        item_id=v["item_id"], reviewer=reviewer_label(v["reviewer"], names), kind="pair" if pair else "single",
        label=label, strength=v["strength"],
        flags={role_of.get(gid, gid): list(names) for gid, names in (v["flags"] or {}).items()},
        served_model=item["model"], candidate_id=candidate_id,
        candidate_model=model_label(generations[candidate_id], item["model"]) if candidate_id else None,
        chose_left=chose_left,
        # compared as the export compares them, less its redaction (the same text redacts alike)
        same_text=bool(candidate_id) and answer_text(item).strip() == answer_text(generations[candidate_id]).strip(),
    )
