"""Whether an answer loops: the one rule the text suite, its gate and the server's live count share."""

from __future__ import annotations

from zephyr.textquality import LOOP_REPEATED_SHARE, is_looping, loops, repeated_ngram_share


def test_an_answer_stuck_on_one_sentence_loops_and_prose_or_a_worked_sum_does_not():
    stuck = "These are atoms. " + "They are made up of atoms. " * 12
    prose = ("Plants make sugar from light, water and carbon dioxide. The green pigment chlorophyll absorbs the "
             "light, and the sugar feeds the plant while oxygen leaves through the leaves.")
    worked = "She has 3 + 4 = 7 apples. Then 7 + 5 = 12 apples. Then 12 + 6 = 18 apples. The answer is 18."
    assert repeated_ngram_share(stuck) > 0.8 and loops(stuck)
    assert repeated_ngram_share(prose) == 0.0 and not loops(prose)
    assert repeated_ngram_share(worked) < LOOP_REPEATED_SHARE and not loops(worked)
    # Case and spacing do not hide a repeat; text too short for one 4-gram never loops.
    assert repeated_ngram_share("The sun is hot. the  SUN is hot.") == repeated_ngram_share("the sun is hot. " * 2)
    assert repeated_ngram_share("") == 0.0 and not loops("yes yes yes")


def test_the_threshold_is_inclusive():
    assert is_looping(LOOP_REPEATED_SHARE) and not is_looping(LOOP_REPEATED_SHARE - 1e-9)
