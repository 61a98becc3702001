"""Review statistics against values worked out by hand for a small fixed set of verdicts."""

from __future__ import annotations

import pytest

from service.review.stats import Judgement, compute, for_reviewer, majority


def j(item: str, reviewer: str, label: str, strength: int | None = None, flags=None, left: bool | None = None):
    return Judgement(item_id=item, reviewer=reviewer, kind="pair", label=label, strength=strength,
                     flags=flags or {}, served_model="S", candidate_model="C", chose_left=left)


VERDICTS = [
    j("i1", "r1", "served", 4, left=True), j("i1", "r2", "served", 3, left=True), j("i1", "r3", "served", 4, left=True),
    j("i2", "r1", "candidate", 2, left=True), j("i2", "r2", "served", 1, {"candidate": ["unsafe"]}, left=False),
    j("i3", "r1", "tie"), j("i3", "r2", "tie"),
    j("i4", "r1", "both_bad", flags={"served": ["incorrect"], "candidate": ["incorrect", "off_topic"]}),
    j("i4", "r2", "candidate", 1, left=False), j("i4", "r3", "both_bad"),
    j("i5", "r1", "candidate", 3, left=False), j("i5", "r3", "candidate", 2, left=False),
    j("i6", "r2", "served", 2, left=False), j("i6", "r3", "served", 2, left=False),
]


def test_majority_needs_a_single_most_common_label():
    assert majority(["a", "a", "b"]) == ("a", pytest.approx(2 / 3))
    assert majority(["a", "b"]) == (None, 0.5)
    assert majority([]) == (None, 0.0)


def test_statistics_match_hand_computed_values():
    stats = compute(VERDICTS, skipped={"r3": 1}, overlap=3)
    assert stats["verdicts"] == 14
    assert stats["items"] == {"judged": 6, "complete": 2}
    # Win rates count the complete items only: i1 (served) and i4 (both bad) have all three verdicts; a majority
    # of fewer could still be undone.
    assert stats["win_rate"] == [
        {"model": "C", "items": 2, "wins": 0, "losses": 1, "ties": 0, "both_bad": 1, "win_rate": 0.0},
        {"model": "S", "items": 2, "wins": 1, "losses": 0, "ties": 0, "both_bad": 1, "win_rate": 0.5},
    ]
    # With two reviewers an item, all are complete. Majorities: i1 served, i2 none (1-1), i3 tie, i4 both bad,
    # i5 candidate, i6 served.
    assert compute(VERDICTS, skipped={}, overlap=2)["win_rate"] == [
        {"model": "C", "items": 5, "wins": 1, "losses": 2, "ties": 1, "both_bad": 1, "win_rate": 0.2},
        {"model": "S", "items": 5, "wins": 2, "losses": 1, "ties": 1, "both_bad": 1, "win_rate": 0.4},
    ]
    agreement = stats["agreement"]
    # Reviewer pairs per item: i1 3 (all agree), i2 1 (no), i3 1 (yes), i4 3 (one agrees), i5 1, i6 1: 7 of 10.
    assert agreement["items"] == 6 and agreement["pairs"] == 10 and agreement["raw"] == pytest.approx(0.7)
    # Cohen r1-r2 on i1-i4: po = 2/4, pe = (1*2 + 1*1 + 1*1 + 1*0)/16 = 1/4, kappa = 1/3.
    # r1-r3 on i1, i4, i5: full agreement, kappa = 1.  r2-r3 on i1, i4, i6: po = 2/3, pe = 4/9, kappa = 0.4.
    assert [(c["reviewers"], c["items"], pytest.approx(c["kappa"])) for c in agreement["cohen"]] == [
        (["r1", "r2"], 4, 1 / 3), (["r1", "r3"], 3, 1.0), (["r2", "r3"], 3, 0.4)]
    assert agreement["cohen_mean"] == pytest.approx((1 / 3 + 1 + 0.4) / 3)
    # Fleiss on the four items with two ratings (i2, i3, i5, i6): P = 3/4, Pe = (3/8)^2 + (3/8)^2 + (1/4)^2 = 22/64,
    # kappa = (3/4 - 22/64) / (1 - 22/64) = 13/21.
    assert agreement["fleiss"]["items"] == 4 and agreement["fleiss"]["raters"] == 2
    assert agreement["fleiss"]["kappa"] == pytest.approx(13 / 21)
    assert stats["strength"] == {"1": 2, "2": 4, "3": 2, "4": 2}
    assert stats["flags"] == {"incorrect": 2, "unsafe": 1, "gives_answer": 0, "off_topic": 1}
    assert stats["reviewers"] == [{"reviewer": "r1", "judged": 5, "skipped": 0},
                                  {"reviewer": "r2", "judged": 5, "skipped": 0},
                                  {"reviewer": "r3", "judged": 4, "skipped": 1}]
    assert stats["left_preferred"] == pytest.approx(4 / 10)
    assert stats["labels"]["served"] == 6 and stats["labels"]["good"] == 0


def test_a_pair_of_one_text_twice_is_left_out_of_win_rates_and_counted():
    from dataclasses import replace

    from service.review.store import to_judgement

    same = [replace(v, same_text=True) for v in (j("i7", "r1", "served", 2), j("i7", "r2", "served", 3))]
    with_same = compute(VERDICTS + same, skipped={}, overlap=2)
    assert with_same["win_rate"] == compute(VERDICTS, skipped={}, overlap=2)["win_rate"]
    assert with_same["identical_pairs"] == 1 and with_same["verdicts"] == len(VERDICTS) + 2
    assert compute(VERDICTS + same[:1], skipped={}, overlap=2)["identical_pairs"] == 0  # not complete yet

    def row(text):
        return {"model": "S", "response": [{"content": text}], "params": {}}

    generations = {"g1": row("Water boils at 100 C."), "g2": row("Water boils at 100 C.\n"), "g3": row("It boils.")}
    verdict = {"item_id": "g1", "left_id": "g2", "right_id": "g1", "verdict": "a", "chosen_id": "g2",
               "reviewer": None, "strength": 2, "flags": None}
    assert to_judgement(verdict, generations).same_text
    assert not to_judgement({**verdict, "left_id": "g3", "chosen_id": "g3"}, generations).same_text
    assert not to_judgement({**verdict, "right_id": None, "left_id": "g1", "verdict": "good"}, generations).same_text


def test_no_verdicts_and_undefined_kappa_are_reported_as_none():
    empty = compute([], {}, 2)
    assert empty["win_rate"] == [] and empty["agreement"]["raw"] is None
    assert empty["agreement"]["fleiss"]["kappa"] is None and empty["left_preferred"] is None
    unanimous = compute([j("i1", "r1", "tie"), j("i1", "r2", "tie"), j("i2", "r1", "tie"), j("i2", "r2", "tie")],
                        {}, 2)
    assert unanimous["agreement"]["raw"] == 1.0
    assert unanimous["agreement"]["cohen"][0]["kappa"] is None  # one category only: chance agreement is 1


def test_a_reviewer_sees_the_others_under_numbers_and_the_same_figures():
    stats = compute(VERDICTS, skipped={"r3": 1}, overlap=3)
    secret = {"r3": "a", "r1": "b", "r2": "c"}.__getitem__  # a keyed digest's order, unrelated to the names'
    seen = for_reviewer(stats, own="r2", secret_order=secret)
    assert seen["reviewers"] == [{"reviewer": "reviewer 1", "judged": 4, "skipped": 1},  # r3
                                 {"reviewer": "reviewer 2", "judged": 5, "skipped": 0},  # r1
                                 {"reviewer": "r2", "judged": 5, "skipped": 0}]
    assert [(c["reviewers"], pytest.approx(c["kappa"])) for c in seen["agreement"]["cohen"]] == [
        (["reviewer 1", "reviewer 2"], 1.0), (["reviewer 1", "r2"], 0.4), (["reviewer 2", "r2"], 1 / 3)]
    blind = ("reviewers", "agreement", "labels", "win_rate")  # which model won is an admin's (blind A/B)
    assert {k: v for k, v in seen.items() if k not in blind} == {k: v for k, v in stats.items() if k not in blind}
    assert seen["win_rate"] is None and "served" not in seen["labels"]
    assert "r1" not in str(seen) and "r3" not in str(seen)
    assert stats["reviewers"][0]["reviewer"] == "r1"  # the admin's view is left as it was
    # a reviewer whose own name is a pseudonym's is never shown a second row of that name
    named = compute([j("i1", "reviewer 1", "tie"), j("i1", "x", "tie")], skipped={}, overlap=2)
    assert [r["reviewer"] for r in for_reviewer(named, "reviewer 1", str)["reviewers"]] == ["reviewer 1", "reviewer 2"]
