"""A multiple-choice question written into a chat message, and the opening of the tutor's answer to it.

Students paste exam questions into ordinary chat clients ("Which gas do plants absorb? A) Oxygen B) Carbon
dioxide ..."). Asked that way, the default model names an option by habit; asked through /mcq, the same model
ranks the options by their text far better (docs/evaluation.md). So the chat route reads such a question out of
the student's message, answers it as /mcq would, and lets the model explain from that answer
(docs/evaluation.md, "Multiple-choice questions asked in chat")."""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable

from zephyr.mcq import LETTERS, MCQFormatError, MCQuestion

# An option label: "A)", "A.", "A:", "(A)", or lower case "a)" / "(a)"; at the start of the text or of a line, or
# after whitespace, and followed by whitespace. "a." and "a:" are left out: they read as words ("a. k. a.").
_LABEL_FORMS = r"\((?P<paren>[A-Ja-j])\)|(?P<upper>[A-J])(?P<upper_mark>[).:])|(?P<lower>[a-j])\)"
_LABEL = re.compile(rf"(?:(?<=\s)|^)(?:{_LABEL_FORMS})(?=\s)", re.MULTILINE)
# Options written on one line could be prose ("plan A. ... plan B."): one line needs three labels in order.
MIN_INLINE_OPTIONS = 3
MAX_CANDIDATES = 8  # runs of labels read as a possible question before the message is taken for no question
# A sentence's end and the start of another ("Helium. Please explain why.", "3.5 m/s. Why?"): not "E. coli" or "3.5"
# (`sentence_end` also passes over an abbreviation's or an initial's dot: "Dr. Benjamin Franklin", "U.S. Navy").
# A student's next sentence may start in small letters too, where its first word is one a sentence of theirs opens
# with ("D) Helium. my answer is B, is that right?"): not an option's own words.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z]|i\s|(?:my|i'm|im|is|isn't|am|can|could|please|why|what|which|how|"
                           r"thanks|thank|explain|also|and\s+why)\b)")
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "st", "mt", "ft", "gen", "prof", "jr", "sr", "lt", "col", "capt",
                            "sgt", "gov", "pres", "rev", "vs", "fig", "vol", "approx", "dept", "univ", "inc",
                            "co", "corp", "ltd", "mx", "etc"})


def sentence_end(text: str) -> int | None:
    """Where the first sentence of `text` ends when another follows it, or None."""
    for found in _SENTENCE_END.finditer(text):
        # The word the stop ends, with its stop: read back to its start (slicing the text before every stop was
        # quadratic in a message of many short sentences, on the event loop).
        start = found.start()
        while start > 0 and not text[start - 1].isspace():
            start -= 1
        if _abbreviated(text[start:found.start()]):
            continue
        return found.start()
    return None


def _abbreviated(word: str) -> bool:
    """Whether a word's closing dot is an abbreviation's or an initial's, not a sentence's end: "Dr.", "U.S.", "J."
    (a capital: "7." or "x." ends a sentence; "No. 5" has no capital after it)."""
    stem = word[:-1]
    return word.endswith(".") and (stem.lower() in _ABBREVIATIONS or "." in stem or (len(stem) == 1 and stem.isupper()))
# A line that only introduces the options, left out of the stem.
# Both written so that no run of spaces is scanned once per space it holds (quadratic on a pasted run of blanks):
# a match never starts inside a run of spaces or tabs (it would start at the run's beginning), and no two
# quantifiers split the same whitespace between them.
# It starts at the text's start or after a line's or a sentence's end: "healthy food choices:" keeps its last word.
_INTRODUCER = re.compile(r"(?:^|(?<=[\n?.!]))[ \t]*(?:answer\s+)?(?:options|choices)\s*(?::\s*)?$", re.IGNORECASE)
_QUESTION_CUE = re.compile(r"^\s*question\s*(?:\d+\s*)?[:.]\s*", re.IGNORECASE)
# Homework is written in lettered parts too ("a) Find the speed. b) How far does it go?"): labelled items that are
# tasks or questions themselves are parts to work through, not options to choose from. Half of them starting with a
# task's verb or ending in "?" reads as parts; about 1% of the benchmarks' real options do (answered as any chat).
_TASK = re.compile(r"^(?:find|calculate|compute|explain|describe|determine|show|prove|state|give|draw|list|compare|"
                   r"solve|write|estimate|identify|define|discuss|predict|sketch|derive|evaluate|graph|plot|label|"
                   r"convert|suggest|outline|justify)\b", re.IGNORECASE)
# A stem's last line that asks for no choice: a task over the items, which the student wants done ("Compare:\nA)
# mitosis\nB) meiosis"). Not "Find/Calculate/Identify ...", whose items may well be the answers to choose from, nor a
# line that asks "which" or ends in a question.
# Nor a line that asks to classify, match, define or summarize the items, to tell about them, to judge each true
# or false ("Match each term with its definition:"), or to solve or simplify them ("Solve the following:"): their
# answer is no one letter. Not where the line asks to
# choose ("Match List I with List II and choose the correct answer using the codes"), nor a definition of its own
# ("Define f(x) = ... Find ...", "Classify the reaction 2H2 + O2 -> 2H2O:").
_OVER_THE_ITEMS = (r"\s*(?:these|each|them|those|all|both|as|by|with|column|briefly|into|the\s+following|"
                   r"the\s+(?:terms|items|words)\b|:?\s*$)")
_NO_CHOICE = re.compile(r"\s*(?:please\s+|can\s+you\s+)?"
                        r"(?:(?:compare|contrast)\b|"
                        rf"(?:classify|categori[sz]e|match|define|summari[sz]e|tell\s+me\s+about)(?={_OVER_THE_ITEMS})|"
                        r"true\s+or\s+false\b(?=[^\n]*\b(?:each|these|them|the\s+following)\b)|"
                        # a worksheet's parts: "Solve the following:", "Simplify each expression:" and nothing after
                        r"(?:solve|simplify|evaluate|factori[sz]e|expand|differentiate|integrate|balance)\s*"
                        r"(?:(?:the\s+following|these|each|all|both)(?:\s+\w+){0,2})?\s*:?\s*$|"
                        r"(?:explain|describe|discuss|outline|list|review)\b"
                        r"(?:\s*:?\s*$|(?=[^\n]*\b(?:these|each|both|them|the\s+difference|between)\b)))"
                        r"(?![^\n]*\b(?:which|choose|select|pick|codes?)\b)(?![^\n]*\?\s*$)", re.IGNORECASE)
# A line that asks to put the items in order: no question where the options are single items ("Rank these from
# smallest to largest:\nA) atom\nB) cell"), one where each is an order ("A) (2,2), (3,2), (3,4)", "A) 2-1-3-4").
# Not "Order of the reaction ..." nor "Rank of the matrix ...": a verb with its object.
_ORDERING = re.compile(r"\s*(?:please\s+|can\s+you\s+)?(?:(?:rank|arrange|sort|order)\s+"
                       r"(?:the|these|them|those|following|in|into|each|all|from)\b|put\b[^\n]*\border\b)",
                       re.IGNORECASE)
_SEQUENCE = re.compile(r"[,;<>→]|\bthen\b|\w\s*[-–]\s*\w+\s*[-–]\s*\w")
# A question with more than one right option ("Select all that apply.", "Choose two.", "choose two of the
# following", "(choose 2)"), asked in the stem or just after the options: /mcq's one letter would answer it wrongly.
# Not "If you select two cards ...": what follows the number there is what is chosen; nor "Which two objects ...?",
# whose options are pairs.
_SEVERAL_ANSWERS = re.compile(
    r"\ball\s+that\s+apply\b|\b(?:more\s+than\s+one|one\s+or\s+more)\s+(?:correct\s+|right\s+)?(?:answers?|options?|choices?)\b|"
    r"\b(?:select|choose|pick|circle|mark|tick)\s+(?:the\s+)?(?:two|three|four|all|every|both|[2-9])\b"
    r"(?:\s+(?:of\s+)?(?:the\s+)?(?:correct|right|true|following))?"
    r"(?:\s+(?:answers?|options?|choices?|statements?|responses?|letters?|ones|"
    r"of\s+(?:these|them|those|the\s+following|the\s+options))\b|\s*(?=[.:;)!?]|$))",
    re.IGNORECASE | re.MULTILINE)
# A stem's last line that asks to choose, so what follows the options cannot undo it: a question, a wh-word, a blank.
_ASKING = re.compile(r"\?|\b(?:which|what|who|whom|whose|where|when|why|how|choose|select|pick|identify)\b|__",
                     re.IGNORECASE)
# What may follow the options: the student's "why?" about the answer. Another question or task there is theirs
# about the lettered things, which are then no options to choose from: a list ("... Is this the full cell
# theory?"), or prose that names things A, B, C ("resistor A: 2 ohms, resistor B: 4 ohms, resistor C: 6 ohms are in
# series. What is the total?", "vertices A: (0, 0), B: (4, 0), C: (0, 3). Find its area."), whose answer opened
# with one of those "options".
_FOLLOW_UP = re.compile(r"\s*(?:please\s+|and\s+|can\s+you\s+|also\s+)?(?:why|explain|how\s+come|show|justify|"
                        r"give\s+(?:a\s+)?reasons?|answer|correct|letter|which|is\s+it|what'?s\s+the\s+answer|"
                        r"is\s+(?:that|this)\s+(?:right|correct)|my\s+answer|i\s+think|check\s+my)\b",
                        re.IGNORECASE)


# Options pasted from a web page or a chat model's answer: a list's bullet before the label ("- A) water", "* (a)
# water") and bold or italic around it ("**A)** water", "__B.__ water"). Read as the plain label.
# (The closing mark is asked for only where an opening one was read: `(?(2)\2)`.)
_FORMATTED_LABEL = re.compile(
    rf"^([ \t]*)(?:[-*+\u2022][ \t]+)?(\*\*|__|\*|_)?(?P<label>{_LABEL_FORMS})(?(2)\2)(?=[ \t])", re.MULTILINE)


def _unformatted(text: str) -> str:
    """`text` with its option lines' bullets and bold or italic labels written plainly (`_FORMATTED_LABEL`)."""
    return _FORMATTED_LABEL.sub(lambda m: m[1] + m["label"], text)


def _labels(text: str) -> list[tuple[int, int, str, str, bool]]:
    """Every label: (start, end, letter, style, at a line's start)."""
    found, since = [], 0
    for m in _LABEL.finditer(text):
        if m["paren"]:
            letter, style = m["paren"], "paren-upper" if m["paren"].isupper() else "paren-lower"
        elif m["upper"]:
            letter, style = m["upper"], f"upper{m['upper_mark']}"
        else:
            letter, style = m["lower"], "lower)"
        # Only the text since the previous label is read: that label is on its line, so a label with no line break
        # after it is not at a line's start. Searching back to the line's start from every label is quadratic in
        # one long line of labels ("A) A) A) ...").
        before, since = text[since:m.start()], m.start()
        at_line_start = not before[before.rfind("\n") + 1:].strip()
        if not at_line_start and _LINE_ENDS.match(text, m.end()):
            continue  # a line's last word: "Vitamin A." or "point A.", not a label with its option after it
        found.append((m.start(), m.end(), letter.upper(), style, at_line_start))
    return found


_LINE_ENDS = re.compile(r"[^\S\n]*(?:\n|$)")  # blanks up to the line's end (only the blanks are read)


def _run_from(text: str, labels: list[tuple[int, int, str, str, bool]], first: int,
              where: dict[tuple[str, str], list[int]]) -> tuple[list[tuple[int, int, str, str, bool]], bool, bool]:
    """The labels A, B, C, ... in order and in one style, starting at labels[first] (an "A"): each the first label
    of its letter and style after the one before. Options on lines of their own end before the style's next "A"
    at a line's start (a second pasted question's C and D were read as the first's, which has two options; an "A"
    an option quotes, "C) Both A) and B)", is no end), and at a label in the student's prose on a later line ("A)
    Shark\nB) Whale\nI saw this in part C) of my worksheet."; not "C) 3   D) 4", two options on one line). `where`
    holds the indices of each (style, letter)'s labels, so a run takes a search per letter, not a pass over every
    later label for every "A" (quadratic in many labels). Also whether the run skips a letter: a later letter of
    its kind (on a line of its own where the run's are) comes after its last label, before that next "A" ("A)
    Oxygen\nB) Helium\nD) Neon"); and whether another run follows (that "A", a "B" after it)."""
    style = labels[first][3]
    end = len(labels)
    if labels[first][4]:
        next_as = where.get((style, "A"), [])
        end = next((j for j in next_as[bisect.bisect_right(next_as, first):] if labels[j][4]), len(labels))
    run, at = [labels[first]], first
    while len(run) < len(LETTERS):
        later = where.get((style, LETTERS[len(run)]), [])
        k = bisect.bisect_right(later, at)
        if k == len(later) or later[k] >= end:
            break
        label = labels[later[k]]
        if len(run) >= 2 and run[0][4] and run[1][4] and not label[4] and "\n" in text[run[-1][1]:label[0]]:
            break
        at = later[k]
        run.append(label)
    on_lines = run[0][4] and (len(run) < 2 or run[1][4])
    skips = any(label[3] == style and label[2] > run[-1][2] and (label[4] or not on_lines)
                for label in labels[at + 1:end])
    next_bs = where.get((style, "B"), [])
    followed = end < len(labels) and bisect.bisect_right(next_bs, end) < len(next_bs)
    return run, skips, followed


def without_separator(value: str) -> str:
    """A one-line option without what separates it from the next ("A) Oxygen, B) Carbon dioxide, or C) ..."): not
    its text, which cloze scores (a trailing "," or ", or" on every option but the last tilted the scores toward the
    last). By hand, not a `...$` pattern, which re.sub tries at every blank of a long run of them (quadratic)."""
    value = value.rstrip()
    for word in (" or", " and"):
        if value.lower().endswith(word):
            value = value[: -len(word)].rstrip()
            break
    return value.rstrip(",;").rstrip()


def _without_closing_stop(value: str, others: list[str]) -> str:
    """The last of a line of options without the stop that ends the student's sentence ("... C) NaCl D) O2."), where
    no other option ends so: cloze scored it, tilting the scores against the last option. Not an abbreviation's
    or an initial's dot ("C) the U.S.", "B) J. S. Bach.")."""
    if not value or value[-1] not in ".?!" or any(other.endswith(value[-1]) for other in others) or \
            _abbreviated(value.rsplit(None, 1)[-1]):
        return value
    return value[:-1].rstrip() or value


_NUMBER = re.compile(r"^[-+]?[\d.,/]*\d$")  # "50", "3.5", "1/2": a unit's number (not "3." ending a sentence)
_LABEL_WORD = re.compile(r"^\(?[A-Ja-j][).:]?\)?$")


def _words_before(text: str, at: int) -> list[str]:
    """The words just before position `at` (a label's start), as written, nearest last; none at a line's start
    (a bounded look back: a label's words are near it)."""
    before = text[max(0, at - 64):at].rstrip(" \t")
    if not before or before[-1] == "\n":
        return []
    return before[before.rfind("\n") + 1:].split()[-2:]


def _named_in_prose(words_before: list[list[str]]) -> bool:
    """Labels on one line that name things in prose, not options: each after the same word ("Vitamin A: ...
    Vitamin B: ... Vitamin C: ..."; not a unit after a number, "50 m B) 500 m"), or an option that ends in an
    article ("I got an A. My friend got a B. ..."; not a capital "A", "Vitamin A B) ..."). The first label's words
    end the stem, which may ("Water is a A) solid B) ...")."""
    last = [words[-1] if words else "" for words in words_before]
    units = all(len(words) == 2 and _NUMBER.match(words[0]) for words in words_before[1:])
    same = len({word.lower() for word in last}) == 1 and bool(last[0]) and not units
    # an option that is an article itself ("A) a B) an C) the") follows its label, not other words
    return same or any(words[-1] in ("a", "an", "the") and not (len(words) == 2 and _LABEL_WORD.match(words[0]))
                       for words in words_before[1:] if words)


def _option(text: str, label_end: int, stop: int, *, on_lines: bool, below_labels: bool,
            last: bool) -> tuple[str, str]:
    """An option's text and what follows it before `stop`. An option on a line of its own is the rest of its label's
    line, or the next line with text where options are written below their labels ("A)\nOxygen"). On a line of
    options, an option runs to the next label, and the last one to its line's end or its sentence's ("D) Helium.
    Explain why.")."""
    segment = text[label_end:stop]
    if on_lines or last:
        line, _, after = (segment.lstrip() if below_labels else segment).partition("\n")
    else:
        line, after = segment, ""
    line = line.strip()
    if last and not on_lines and (cut := sentence_end(line)) is not None:
        line, after = line[:cut].removesuffix("."), line[cut:] + "\n" + after
    return (line if on_lines else without_separator(line)), after


# A "which" question after the options that is more than "which one?": the question itself, where the stem before
# the options only introduces them ("Consider:\nA) water\nB) ethanol\nWhich has the highest boiling point?").
_BARE_WHICH = re.compile(
    r"which(?:\s+(?:one|of\s+(?:these|them|those)))?(?:\s+(?:is\s+it|is\s+(?:correct|right)))?\W*$", re.IGNORECASE)


def _question_after(after: str) -> str | None:
    """The "which" question the text after the options asks (its first line, to its "?"), or None."""
    line = after.strip().partition("\n")[0]
    asked, mark, _ = line.partition("?")
    if not mark or not asked.lower().startswith("which") or _BARE_WHICH.match(asked):
        return None
    return asked.strip() + "?"


def _asks_more(after: str) -> bool:
    """Whether the text after the options asks something of its own (a question, a task), not why the answer."""
    after = after.strip()
    return bool(after) and ("?" in after or bool(_TASK.match(after))) and not _FOLLOW_UP.match(after)


def find_questions(text: str, limit: int | None = None) -> list[MCQuestion]:
    """The multiple-choice questions a chat message holds, in order (the first `limit`).

    A question is a stem followed by options labelled A, B, C, ... in order, in one style ("A)", "A.", "A:",
    "(A)", "a)", "(a)"): each on a line of its own (two or more), or three or more on one line. The stem is the
    text before the first label (a leading "Question:" and a closing "Options:" line left out). The last option
    ends at its line's end, and on a line of options at its sentence's: what follows it ("Explain why.") is the
    student's instruction, not part of the option. Items that read as a problem's parts (tasks or questions
    themselves) make no question, nor do options /mcq would refuse (a duplicate, a blank one): the message is
    answered as any chat, nor do questions with more than one right option ("Select all that apply"). A "which"
    question after the options, where the stem asks none, is the stem's question. A list's bullets and bold or
    italic labels ("- A) water", "**B)** ice") are read as plain labels."""
    text = _unformatted(text)
    labels = _labels(text)
    where: dict[tuple[str, str], list[int]] = {}
    for i, label in enumerate(labels):
        where.setdefault((label[3], label[2]), []).append(i)
    candidates, found, follows = 0, [], 0
    for first, label in enumerate(labels):
        if label[2] != "A" or label[0] < follows:  # a label inside the question found before
            continue
        run, skips, followed = _run_from(text, labels, first, where)
        if skips:
            continue  # an option left out: scoring the others would choose among some of them
        on_lines = all(item[4] for item in run)
        if not on_lines and any(item[4] for item in run[1:]) and "\n" in text[run[0][1]:run[1][0]] and any(
                other[2] == "A" and other[3] == label[3] and other[4] for other in labels[first + 1:]):
            continue  # a stem's own "point A. Which ...?" before an "A." of its own line: that one starts the run
        if len(run) < (2 if on_lines else MIN_INLINE_OPTIONS):
            continue
        # Each candidate reads the text around it (its stem, what follows it): a message of thousands of lettered
        # runs is no pasted question, and reading each would be quadratic in its length.
        candidates += 1
        if candidates > MAX_CANDIDATES:
            break
        stem = _QUESTION_CUE.sub("", _INTRODUCER.sub("", text[: run[0][0]].rstrip())).strip()
        stem_line = stem[stem.rfind("\n") + 1:]
        if not stem or _NO_CHOICE.match(stem_line):  # "Compare:", "Explain the difference:"
            continue
        if not on_lines and _named_in_prose([_words_before(text, label[0]) for label in run]):
            continue
        below_labels = on_lines and not text[run[0][1]:].partition("\n")[0].strip()
        options, after = [], ""
        for i, (_, end, *_rest) in enumerate(run):
            last = i + 1 == len(run)
            value, after = _option(text, end, len(text) if last else run[i + 1][0], on_lines=on_lines,
                                   below_labels=below_labels, last=last)
            options.append(value)
        # a stem that asks already ("Which ...?", "Choose ...:") is a question, whatever the student adds after it;
        # so is one another question follows, whose stem is what comes after this one's options
        if not _ASKING.search(stem_line) and not followed:
            if asked := _question_after(after):
                stem = f"{stem}\n{asked}"
            elif _asks_more(after):
                continue
        if _SEVERAL_ANSWERS.search(stem) or _SEVERAL_ANSWERS.search(after.strip().partition("\n")[0]):
            continue
        if _ORDERING.match(stem_line) and not _ASKING.search(stem_line) and \
                not any(_SEQUENCE.search(o) for o in options):
            continue  # items to put in order, not orders to choose from
        if sum(bool(_TASK.match(o)) or o.endswith("?") for o in options) * 2 >= len(options):
            continue  # parts of a problem, not options (a question may still follow)
        if not on_lines:
            options[-1] = _without_closing_stop(options[-1], options[:-1])
        try:
            found.append(MCQuestion.build(stem, options))
        except MCQFormatError:
            continue
        follows = run[-1][1]
        if limit and len(found) >= limit:
            break
    return found


def find_question(text: str) -> MCQuestion | None:
    """The first multiple-choice question a chat message holds (`find_questions`), or None."""
    found = find_questions(text, limit=1)
    return found[0] if found else None


def sure_line(sure: float, options: int) -> float:
    """The confidence at which an answer to a question of `options` options is said plainly. `sure` is read for
    four options, on which it was chosen (the lowest confidence at which /mcq was right four times in five on
    validation), and held to the same share of the way from chance to certainty for fewer: 0.5 is a third of the
    way from four options' 0.25 to 1, so two options need 0.67, not a coin's 0.5. Never below `sure`; at 0.25 or
    under (an operator's "always say it plainly"), `sure` itself."""
    if sure <= 0.25:
        return sure
    chance = 1 / options
    return max(sure, chance + (sure - 0.25) / 0.75 * (1 - chance))


def answer_opening(letter: str | None, option: str | None, confidence: float, sure: float, options: int = 4) -> str:
    """The first words of the tutor's answer, which the model then goes on from: the option /mcq chose, said as
    plainly as its calibrated confidence allows for a question of `options` options (`sure_line`), then the cue
    for the reasons. No letter when /mcq abstained (its `min_confidence`)."""
    if letter is None or option is None:
        return "I'm not sure which of these options is right. Let's think it through:"
    named = f"{letter}) {option}" + ("" if option[-1:] in ".?!" else ".")
    if confidence >= sure_line(sure, options):
        return f"The answer is {named} This is because"
    return f"I'm not sure, but I think the answer is {named} This is because"


# How an answer restates its conclusion ("So, the correct answer is D) ..."). After an opening that named one
# option, the model may not conclude with another this way (vLLM's `bad_words`): a 135M model's explanation
# otherwise ends on another letter in a few answers in a hundred, and a student is left with two answers.
CONCLUSIONS = ("answer is {}", "answer is: {}", "answer is ({}", "answer is option {}", "Answer: {}")


def other_conclusions(letter: str, option: str, options: int,
                      tokens_of: Callable[[str], list[int]] | None = None) -> list[str]:
    """The phrases that would conclude with an option other than `letter` (whose text is `option`), for a question
    of `options` options. vLLM bans a phrase's last token, the bare letter: a letter the chosen option's own text
    starts with ("A chemical change", "H2O", "E. coli") is not banned, or the answer could not name it. Given the
    tokenizer's `tokens_of`, only where that text's first token is the letter's: " Carbon" is one token, not " C",
    so "answer is C" stays banned for "Carbon dioxide" (it let "So the answer is C) Nitrogen" through)."""
    own = option[:1]
    if own and tokens_of is not None:
        letter_ids = tokens_of(" " + own)  # one token here; "▁" and "C" in a SentencePiece vocabulary
        if tokens_of(" " + option)[:len(letter_ids)] != letter_ids:
            own = ""
    return [form.format(other) for other in LETTERS[:options] if other not in (letter, own) for form in CONCLUSIONS]
