"""PII redaction for the generation log and for training data (Microsoft Presidio, pattern recognizers only:
no spaCy model is needed, so it runs offline and in microseconds per message).

What it finds: email addresses, phone numbers, student ids (a letter prefix and 6-9 digits, `S1234567`,
`S-123-4567`; digit-only ids after a cue such as "student", "ID" or "#"; `2023-04417`), street addresses (a
house number, capitalised words and a street suffix) and dates of birth (a date after "born", "birthday",
"DOB" or "date of birth"). What it does not: person names (they need an NER model, spaCy or transformers,
which is not installed), addresses without a street suffix, dates without a birth cue, numbers that read as
science rather than as a phone number (1687, 1642-1727, 130907 cells, 134.897 g/L, 0.1 0.2 0.3, 6.022 140 76;
the rule is at `_science_number`).

Presidio's context words (`PatternRecognizer(context=...)`) do nothing here: the no-op NLP engine gives no
tokens or lemmas to find them in, so each cue is part of its pattern, as a look-behind (Presidio compiles
patterns with the `regex` module, which allows variable-width look-behind) so that only the value itself is
replaced: "born on <DATE_OF_BIRTH>". Presidio matches case-insensitively; `(?-i:...)` marks what must keep
its case."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import tldextract.tldextract
from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
from presidio_analyzer.nlp_engine import NoOpNlpEngine
from presidio_analyzer.predefined_recognizers import EmailRecognizer, PhoneRecognizer
from presidio_anonymizer import AnonymizerEngine

# Presidio's email check asks tldextract for the public-suffix list, which by default downloads it at
# run time; the snapshot bundled with tldextract is enough and keeps the server off the network.
tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())
logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)

PHONE_REGIONS = ("US", "GB", "CA", "AU", "IN", "DE", "FR", "ES", "IT", "NL", "IE", "NZ", "ZA")
SCORE = 0.6

# Student ids beyond the configured letter-prefixed pattern (Settings.student_id_pattern).
# After a cue: 7-10 digits, hyphens allowed between them ("student number: 20231234", "ID 2023-04417", "#1234567");
# after a cue that names a person's id, from 5 digits, a capital letter before them, and slashes or single spaces
# between them too ("ID: 123456", "Student No. 2023/04417", "ID 1234 5678", a UK pupil number "UPN A123456789012"),
# up to three letters before them and a check letter after ("student ID S 1234567", "Matric no: A0123456X").
# "roll" and "candidate" keep the longer form: "roll 10000 dice" is no id.
def _id_cue(words: str, hash_alone: bool) -> str:
    return (rf"(?:\b(?:{words})(?:[ \t_]*(?:id|no\.?|num(?:ber)?|#|code))?(?![\w])"
            r"(?:[ \t]*(?:is|was|:|=|#|-))*[ \t]*" + (r"|#[ \t]?)" if hash_alone else ")"))


# A bare "id" names a person's unless a record of science or of work comes before it ("PubMed ID 19304878",
# "Question ID 123456", "sample ID"): those numbers are the student's question, not who they are.
_NOT_A_PERSONS_ID = (r"(?<!\b(?:pubmed|pmid|pmc|question|sample|specimen|gene|protein|taxonomy|taxon|accession|order|"
                     r"product|item|task|problem|exercise|project|experiment|article|paper|catalog(?:ue)?|star)"
                     r"[ \t]{1,3})")
_STUDENT_WORDS = (r"student|pupil|learner|matric(?:ulation)?|enrol(?:l)?ment|registration|" + _NOT_A_PERSONS_ID
                  + "id")
_PERSON_ID_CUE = _id_cue(rf"{_STUDENT_WORDS}|upn|uln|usi", hash_alone=False)
# A cue that names a student's id by a student's word: a prefix of letters may come first there ("student ID S
# 1234567", "learner id: abc-1234567"), not after a bare "ID" ("ID: HD 209458", a star's catalogue name).
_STUDENTS_CUE = _id_cue(r"student|pupil|learner|matric(?:ulation)?|enrol(?:l)?ment|registration", hash_alone=False)
_ID_CUE = _id_cue(rf"{_STUDENT_WORDS}|roll|candidate", hash_alone=True)
_ID_DIGITS = r"\d(?:[-/ ]?\d){4,12}(?-i:[A-Z])?(?![\w-]|[/ ]\d)"  # a check letter after them: "A0123456X"
STUDENT_ID_AFTER_CUE = (rf"(?:(?<={_ID_CUE})\d(?:-?\d){{6,9}}(?![\w-])"
                        rf"|(?<={_PERSON_ID_CUE})(?-i:[A-Z])?{_ID_DIGITS}"
                        rf"|(?<={_STUDENTS_CUE})(?:(?-i:[A-Z]{{1,3}})[ -]?|[a-z]{{1,3}}-){_ID_DIGITS})")
# Anywhere: a letter prefix, a hyphen and 6-9 digits ("S-123-4567"), and a 2-4 digit prefix with a serial that
# starts with 0 ("2023-04417"; a range such as 2000-20000 never has a leading zero, a date's parts are shorter).
STUDENT_ID_HYPHENATED = r"(?<![\w-])(?-i:[A-Z]{1,3}|[a-z]{1,3})-\d(?:-?\d){5,8}(?![\w-])"  # not "pH-7654321"
STUDENT_ID_SERIAL = r"(?<![\w.,/-])\d{2,4}-0\d{4,7}(?![\w/-]|[.,]\d)"

# A house number (with an optional "Flat 3," before it), one to four capitalised words (or an ordinal: 5th) and
# a street suffix, then an optional compass direction: "42 Elm Street", "1600 Pennsylvania Ave NW".
# Suffixes that are also words of a lab step or a formula ("2 Gently place the flask", "Step 4 Carefully close",
# "2 Natural ln") count only capitalised or in capitals, as an address writes them ("5 GAPDH Ct" still reads as one).
_AMBIGUOUS_SUFFIXES = ("drive", "dr", "court", "ct", "place", "pl", "way", "close", "ln")
_STREET_SUFFIX = (
    r"(?:street|st|avenue|ave|road|rd|lane|boulevard|blvd|terrace|crescent|cres|grove|parkway|pkwy|highway|hwy|"
    r"mews|(?-i:"
    + "|".join(f"{w.capitalize()}|{w.upper()}" for w in _AMBIGUOUS_SUFFIXES) + ")"
    # in small letters where the address ends its clause ("I live at 12 Oak drive."): a lab step goes on
    + "|(?-i:" + "|".join(_AMBIGUOUS_SUFFIXES) + r")(?=[ \t]*(?:[,.;:!?)]|$|\band\b)))"
)
_STREET_WORD = r"(?:(?-i:[A-Z][A-Za-z'’.-]*)|\d{1,3}(?:st|nd|rd|th))"
STREET_ADDRESS = (
    r"(?:\b(?:flat|apt|apartment|unit|suite)\.?[ \t]*\d{1,4}(?-i:[A-Z])?,?[ \t]+)?"
    r"(?<![\w.,/-])\d{1,5}(?-i:[A-Z])?,?[ \t]+"
    r"(?!(?:the[ \t]+)?milky[ \t]+way\b)"  # "Figure 2 The Milky Way"
    r"(?!(?:waxing|waning|fertile)[ \t]+crescent\b)"  # "2 Waxing Crescent", "the 5 Fertile Crescent cities"
    rf"(?:{_STREET_WORD}[ \t]+){{1,4}}{_STREET_SUFFIX}\b"
    r"(?:[ \t]+(?-i:NW|NE|SW|SE|N|S|E|W)\b)?"
)

# A date right after a birth cue (up to 30 characters of words between, none a digit or a sentence end).
_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b\.?"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
# A living person's year: "Isaac Newton was born on 25 December 1642" is history, not a student's birthday.
_YEAR = r"(?:19|20)\d{2}"
_NO_OLDER_YEAR = r"(?!,?[ \t]+\d)"  # a day and month the optional modern year did not take: no year after them
_BIRTH_CUE = r"\b(?:born|birth[ \t]*day|birth[ \t]+date|date[ \t]+of[ \t]+birth|d\.?o\.?b\.?)(?!\w)[^\d\n.!?;]{0,30}"
DATE_OF_BIRTH = (
    rf"(?<={_BIRTH_CUE})(?:"
    rf"{_YEAR}[-/.]\d{{1,2}}[-/.]\d{{1,2}}"  # 2009-04-05
    rf"|\d{{1,2}}[-/.]\d{{1,2}}[-/.](?:{_YEAR}|\d{{2}})"  # 05/04/2009, 5.4.09
    rf"|{_DAY}(?:[ \t]+of)?[ \t]+{_MONTH}(?:,?[ \t]+{_YEAR})?{_NO_OLDER_YEAR}"  # 5th of April 2009, 5 Apr
    rf"|{_MONTH}[ \t]+{_YEAR}"  # April 2009
    rf"|{_MONTH}[ \t]+{_DAY}(?:,?[ \t]+{_YEAR})?{_NO_OLDER_YEAR}"  # April 5th, 2009
    r")(?![\w/-]|[.]\d)"
)


# The phone recognizer reads many science numbers as numbers of one of PHONE_REGIONS: 1640-1649 and 1680-1699 as
# German ones (Newton's Principia of 1687 became <PHONE_NUMBER>), year ranges (1642-1727), some 5-6 digit counts,
# decimals (134.897 g/L, 0.1 0.2 0.3, 6.022 140 76 x 10^23) and ranges (134-897 nm). What is left a phone number
# (an extension such as "ext. 12" aside): anything with a "+", a closed bracket or a trunk 0 (030.1234567); else one
# digit run of 9 digits or more (4155550132), or separators between 7 digits or more and not a single decimal point
# (415.555.0132). Checked against the recognizer alone in tests/unit/test_pii.py.
_EXTENSION = re.compile(r"\s*(?:ext\.?|extension|x|#)\s*\d+$", re.IGNORECASE)
_YEAR_RANGE = re.compile(r"\(?[1-9]\d{3}\s*[-–]\s*\d{4}")
_BELOW_ONE = re.compile(r"(?<![\d.])0\.\d")


def _science_number(matched: str) -> bool:
    found = _EXTENSION.sub("", matched)
    if "+" in found or ")" in found or re.match(r"0\d", found):
        return False
    if _YEAR_RANGE.fullmatch(found) or _BELOW_ONE.search(found):
        return True
    found = found.lstrip("(")
    if found.isdigit():
        return len(found) < 9
    return sum(c.isdigit() for c in found) < 7 or found.count(".") == 1


class SciencePhoneRecognizer(PhoneRecognizer):
    """Presidio's phone recognizer without the numbers it misreads in science text (`_science_number`)."""

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
        return [r for r in super().analyze(text, entities, nlp_artifacts)
                if not _science_number(text[r.start:r.end]) and not _in_a_decimal_or_power(text, r.start, r.end)]


def _in_a_decimal_or_power(text: str, start: int, end: int) -> bool:
    """Digits after a decimal point, or before a power: "k = 8.9875517923 x 10^9" read as a phone number with an
    extension ("x 10") from its fractional digits on."""
    return bool(re.fullmatch(r"\d\.", text[max(0, start - 2):start])) or text[end:end + 1] == "^"


class Redactor:
    """Replaces each detected entity with its type in angle brackets, e.g. ``<EMAIL_ADDRESS>``."""

    def __init__(self, entities: Iterable[str], student_id_pattern: str):
        self.entities = list(entities)
        registry = RecognizerRegistry(supported_languages=["en"])
        registry.add_recognizer(EmailRecognizer())
        registry.add_recognizer(SciencePhoneRecognizer(supported_regions=PHONE_REGIONS))
        registry.add_recognizer(PatternRecognizer(supported_entity="STUDENT_ID", patterns=[
            # Case-blind, as Presidio matches: a student may type "s1234567". A SNP ("rs429358") or a star's catalogue
            # name (HD209458) of that shape is redacted too: a privacy rule errs on that side.
            Pattern("student_id", student_id_pattern, SCORE),
            Pattern("student_id_after_cue", STUDENT_ID_AFTER_CUE, SCORE),
            Pattern("student_id_hyphenated", STUDENT_ID_HYPHENATED, SCORE),
            Pattern("student_id_serial", STUDENT_ID_SERIAL, SCORE),
        ]))
        registry.add_recognizer(PatternRecognizer(
            supported_entity="STREET_ADDRESS", patterns=[Pattern("street_address", STREET_ADDRESS, SCORE)]))
        registry.add_recognizer(PatternRecognizer(
            supported_entity="DATE_OF_BIRTH", patterns=[Pattern("date_of_birth", DATE_OF_BIRTH, SCORE)]))
        self._analyzer = AnalyzerEngine(
            registry=registry,
            nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}]),
            supported_languages=["en"],
        )
        self._anonymizer = AnonymizerEngine()

    def redact(self, text: str) -> str:
        if not text or not self.entities:
            return text
        results = self._analyzer.analyze(text, language="en", entities=self.entities)
        if not results:
            return text
        return self._anonymizer.anonymize(text, results).text
