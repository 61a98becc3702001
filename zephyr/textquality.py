"""Whether a generated answer loops: one definition for the offline text suite (evals), its gate, and the live
count the server exports (service), so that the figure an operator watches is the one a candidate was gated on."""

from __future__ import annotations

import re

# An answer loops when at least half of its word 4-grams repeat an earlier one of the same answer: seq-rep-4 of
# Welleck et al. 2019 ("Neural text generation with unlikelihood training"), per answer. Half is a definition, not
# a fit: prose repeats a few 4-grams, a worked sum more ("= 12 + 3" patterns: 0.4 at most in 20 GSM8K answers of
# the default model), and an answer stuck on one sentence until its token budget ends sits at 0.6-0.9.
LOOP_NGRAM = 4
LOOP_REPEATED_SHARE = 0.5
_WORDS = re.compile(r"\w+|[^\w\s]")


def repeated_ngram_share(text: str, n: int = LOOP_NGRAM) -> float:
    """The share of the text's word n-grams (words and punctuation, case folded) that occurred earlier in it."""
    words = _WORDS.findall(text.lower())
    ngrams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def loops(text: str) -> bool:
    return is_looping(repeated_ngram_share(text))


def is_looping(share: float) -> bool:
    """The rule on an already computed `repeated_ngram_share`."""
    return share >= LOOP_REPEATED_SHARE
