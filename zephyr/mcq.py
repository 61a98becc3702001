"""The one MCQ format: serving, evals and training render questions and read letters through this module,
so an accuracy measured offline is the accuracy the service delivers."""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zephyr.encoder import ENCODER_NAME, check_head, embed

MIN_OPTIONS = 2
MAX_OPTIONS = 10
LETTERS = string.ascii_uppercase[:MAX_OPTIONS]

MCQ_SYSTEM_PROMPT = (
    "You are Zephyr, a science tutor. Read the question and the lettered options carefully and pick the "
    "single best option."
)
DIRECT_INSTRUCTION = "Answer with the letter of the correct option."
EXPLAIN_INSTRUCTION = "Explain your reasoning in a few sentences, then give the letter of the correct option."
# Appended after the tutor's reasoning; the next token is then restricted to " A", " B", ...
FINAL_ANSWER_CUE = "\n\nAnswer:"
# The reasoning stops where the tutor starts its own answer line, so the cue above is never doubled.
EXPLAIN_STOP = ["Answer:", "answer:"]
# Tokens kept free after the reasoning for the answer cue, and for re-tokenization drift.
EXPLAIN_CUE_MARGIN = 8


def explain_budget(prompt_tokens: int, max_model_len: int, max_prompt_tokens: int | None, max_tokens: int) -> int:
    """Tokens of reasoning `explain` may write after a question of `prompt_tokens`, so that the reasoning and the
    answer cue still fit the prompt limit (ZEPHYR_MAX_PROMPT_TOKENS, at most the context less one): the service
    refuses a question this leaves below 1, and evals measure what it would serve."""
    limit = min(max_prompt_tokens or max_model_len - 1, max_model_len - 1)
    return min(max_tokens, limit - prompt_tokens - EXPLAIN_CUE_MARGIN)


class MCQFormatError(ValueError):
    """A question that cannot be rendered; the message says what to fix (the service answers 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MCQuestion:
    question: str
    options: tuple[str, ...]
    support: str | None = None  # a passage the question is about (SciQ's support), shown before the question

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    @classmethod
    def build(cls, question: Any, options: Sequence[str] | Mapping[str, str], support: Any = None) -> MCQuestion:
        if not isinstance(question, str) or not shows_text(question):
            raise MCQFormatError("`question` must be a non-empty string", "question")
        if support is not None and not isinstance(support, str):
            raise MCQFormatError("`support` must be a string (a passage the question is about) or absent", "support")
        return cls(question.strip(), tuple(normalize_options(options)), normalize_support(support))

    def option_for(self, letter: str) -> str:
        return self.options[self.letters.index(letter)]

    @property
    def longest_part(self) -> str:
        """The field a question over a length limit is named by (a short question with a 32 KB support passage was
        told to shorten `question`)."""
        return longest_part(self.question, self.options, self.support)


def longest_part(question: str, options: Sequence[str], support: str | None) -> str:
    """"question", "options" or "support": whichever holds the most characters (the first of equals)."""
    parts = {"question": len(question), "options": sum(len(o) for o in options), "support": len(support or "")}
    return max(parts, key=parts.__getitem__)


# Characters that show nothing and change no letter beside them: a zero-width space, word joiner, byte-order mark,
# soft hyphen and the direction marks. Not every format character: a zero-width (non-)joiner shapes Persian words
# and emoji sequences, and tag characters make the flags of England and Scotland.
INVISIBLE = frozenset("\u200b\u2060\ufeff\u00ad\u200e\u200f")


def shows_text(text: str) -> bool:
    """Whether `text` holds a character a reader sees: not only whitespace and INVISIBLE characters, which made an
    option that was scored but looked blank."""
    return any(not c.isspace() and c not in INVISIBLE for c in text)


def _seen(text: str) -> str:
    """`text` as it looks: its INVISIBLE characters left out ("a" and "a\u200b" are one option)."""
    return "".join(c for c in text if c not in INVISIBLE)


def normalize_support(support: str | None) -> str | None:
    """A passage with its outer whitespace removed; an empty one is no passage."""
    return (support or "").strip() or None


def normalize_options(options: Sequence[str] | Mapping[str, str]) -> list[str]:
    """Options as a list, from a list or from an object keyed A, B, C... in order."""
    if isinstance(options, Mapping):
        if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:  # the count first: 11 keys are not "the wrong letters"
            raise MCQFormatError(
                f"`options` must have between {MIN_OPTIONS} and {MAX_OPTIONS} entries, got {len(options)}", "options")
        keys = [str(k).strip().upper() for k in options]
        expected = list(LETTERS[: len(keys)])
        if keys != expected:
            raise MCQFormatError(
                f"`options` keys must be the letters {', '.join(expected) or 'A, B'} in order, got {', '.join(keys)}",
                "options",
            )
        values = list(options.values())
    elif isinstance(options, Sequence) and not isinstance(options, str):
        values = list(options)
    else:
        raise MCQFormatError("`options` must be a list of strings or an object keyed by letters", "options")
    if not MIN_OPTIONS <= len(values) <= MAX_OPTIONS:
        raise MCQFormatError(
            f"`options` must have between {MIN_OPTIONS} and {MAX_OPTIONS} entries, got {len(values)}", "options"
        )
    cleaned = []
    for i, value in enumerate(values):
        if not isinstance(value, str) or not shows_text(value):
            raise MCQFormatError(f"option {LETTERS[i]} must be a non-empty string (visible characters)", "options")
        cleaned.append(" ".join(value.split()))
    # The same text twice (spacing and invisible characters aside); case is meaning in science: genotypes RR, Rr,
    # rr; Co and CO; mW and MW.
    seen = [" ".join(_seen(v).split()) for v in cleaned]
    duplicates = sorted({LETTERS[i] for i, v in enumerate(seen) if seen.count(v) > 1})
    if duplicates:
        raise MCQFormatError(f"options {', '.join(duplicates)} are duplicates; each option must differ", "options")
    return cleaned


def render_user_message(q: MCQuestion, explain: bool = False) -> str:
    lines = [q.support, ""] if q.support else []
    lines += [f"Question: {q.question}", ""]
    lines += [f"{letter}. {option}" for letter, option in zip(q.letters, q.options, strict=True)]
    lines += ["", EXPLAIN_INSTRUCTION if explain else DIRECT_INSTRUCTION]
    return "\n".join(lines)


def render_messages(q: MCQuestion, explain: bool = False, system_prompt: str | None = MCQ_SYSTEM_PROMPT) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": render_user_message(q, explain)})
    return messages


def render_prompt(tokenizer: Any, q: MCQuestion, explain: bool = False, reasoning: str | None = None) -> str:
    """The full prompt text. Without reasoning the next token is the letter itself ("B"); after reasoning
    the prompt ends with FINAL_ANSWER_CUE and the next token is the letter with a space (" B")."""
    text = tokenizer.apply_chat_template(render_messages(q, explain), tokenize=False, add_generation_prompt=True)
    if reasoning is not None:
        text += answer_cue_after(reasoning)
    return text


def answer_cue_after(reasoning: str) -> str:
    """What follows the prompt once the tutor has reasoned: its reasoning, then the cue the letter is read after."""
    return reasoning.rstrip() + FINAL_ANSWER_CUE


def encode_prompt(tokenizer: Any, q: MCQuestion, explain: bool = False, reasoning: str | None = None) -> list[int]:
    """The prompt's token ids exactly as the service sends them to the engine (the template adds specials)."""
    return tokenizer.encode(render_prompt(tokenizer, q, explain, reasoning), add_special_tokens=False)


def letter_token_ids(tokenizer: Any, count: int, leading_space: bool = False) -> list[int]:
    """Token id of each of the first `count` letters; each letter must be exactly one distinct token."""
    ids = []
    for letter in LETTERS[:count]:
        encoded = tokenizer.encode((" " if leading_space else "") + letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise MCQFormatError(f"tokenizer splits option letter {letter!r} into {len(encoded)} tokens")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise MCQFormatError("tokenizer maps two option letters to the same token")
    return ids


def letter_distribution(letters: str, logprobs: Sequence[float]) -> tuple[dict[str, float], str]:
    """Probabilities over exactly the option letters (the letters' log-probabilities renormalized, summing to 1)
    and the most likely letter: the argmax of the log-probabilities themselves (ties go to the earlier letter, as
    argmax does), not of the probabilities, where two close values can round to the same float. A NaN counts as
    impossible (-inf): max() over NaNs depends on where they stand."""
    logprobs = [-math.inf if math.isnan(x) else x for x in logprobs]
    peak = max(logprobs)
    if not math.isfinite(peak):
        raise ValueError("no option letter has a finite log-probability")
    weights = [math.exp(x - peak) for x in logprobs]
    total = sum(weights)
    probabilities = {letter: w / total for letter, w in zip(letters, weights, strict=True)}
    return probabilities, letters[logprobs.index(peak)]


# Cloze ----------------------------------------------------------------------------------------------------
# Each option's text is scored as the continuation of the question, as lm-eval scores multiple_choice tasks
# (evals/tasks/*.yaml declare this same prompt; a unit test keeps them equal).
CLOZE_DELIMITER = " "


def cloze_context(q: MCQuestion, demonstrations: str = "") -> str:
    """The question as cloze scores it, after the calibration record's solved examples (`demonstrations`)."""
    question = f"Question: {q.question}\nAnswer:"
    return demonstrations + (f"{q.support}\n{question}" if q.support else question)


def cloze_continuation(option: str) -> str:
    """The text scored after the cloze context for one option: the delimiter, then the option's text."""
    return CLOZE_DELIMITER + option


def cloze_split(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """The token ids of context + continuation and the context's length in tokens, split as lm-eval splits them:
    the pair is encoded whole (no special tokens) and the context's own encoding length marks the boundary, so a
    merge across the boundary is scored as lm-eval scores it. The one tokenization of a cloze pair: /mcq, evals and
    training (training/data/cloze.py) all call it."""
    context_length = len(tokenizer.encode(context, add_special_tokens=False))
    return tokenizer.encode(context + continuation, add_special_tokens=False), context_length


def cloze_requests(tokenizer: Any, q: MCQuestion, demonstrations: str = "") -> list[tuple[list[int], int]]:
    """Per option, cloze_split of the question's cloze context and the option's continuation."""
    context = cloze_context(q, demonstrations)
    return [cloze_split(tokenizer, context, cloze_continuation(option)) for option in q.options]


# Solved examples before every cloze prompt (few-shot, as lm-eval's num_fewshot): with them the default model ranks
# the options better on every validation set but OpenBookQA (docs/evaluation.md, "Demonstrations"). They are one
# fixed text for every question, so after the first request vLLM's prefix cache holds their KV blocks.
DEMONSTRATION_SEPARATOR = "\n\n"
DEMONSTRATIONS_MAX_CHARS = 4000


def render_demonstrations(examples: Sequence[tuple[MCQuestion, str]]) -> str:
    """Each (question, its key's text) as cloze renders it with the answer filled in, then a blank line."""
    return "".join(cloze_context(q) + cloze_continuation(answer) + DEMONSTRATION_SEPARATOR for q, answer in examples)


# Each option's text also scored after an answer cue, without the question: how likely the text is on its own.
# Subtracting a weight of it from the cloze score (domain-conditional PMI, Holtzman et al. 2021) stops a short or
# common phrase from winning only because it is common, which is how ARC-Challenge and OpenBookQA are built.
# The cue new calibrations score with: a content-free question in the cloze prompt's own format, chosen over the
# bare "Answer:" and four other cues by cross-validated accuracy on the validation splits (docs/evaluation.md).
ANSWER_PRIOR_CONTEXT = "Question: What is the answer?\nAnswer:"
# The cue of records written before the record named its cue (2026-11-30): their weights were fitted on it.
LEGACY_ANSWER_PRIOR_CONTEXT = "Answer:"
ANSWER_PRIOR_CONTEXT_MAX_CHARS = 200


def answer_prior_context_problem(cue: str) -> str | None:
    """Why `cue` cannot be the answer prior's cue, or None: the one rule `zephyr eval calibrate` checks its option by
    before scoring and the record holds its field to (checked apart, the option passed what the record refused after
    the whole run)."""
    if not cue.strip() or len(cue) > ANSWER_PRIOR_CONTEXT_MAX_CHARS:
        return f"the answer prior's cue must hold 1 to {ANSWER_PRIOR_CONTEXT_MAX_CHARS} characters, not only spaces"
    return None


def answer_prior_requests(tokenizer: Any, q: MCQuestion, context: str = ANSWER_PRIOR_CONTEXT,
                          demonstrations: str = "") -> list[tuple[list[int], int]]:
    """Per option, the token ids of the answer cue + the option and the cue's length, split as cloze_requests
    splits them, after the same demonstrations as the question's cloze. A calibrated model is asked with its
    record's cue and demonstrations (Plan.answer_prior_context, Plan.demonstrations)."""
    return [cloze_split(tokenizer, demonstrations + context, cloze_continuation(option)) for option in q.options]


def continuation_positions_missing(num_cached_tokens: int, context_length: int) -> int:
    """How many of the continuation's leading log-probabilities a request read from vLLM's prefix cache lacks.
    The log-probability of the token at position p comes from position p - 1, and vLLM computes (and returns a
    log-probability for) no cached position: a hit of at most context_length - 1 tokens lacks none.

    The rule every cloze scorer applies (offline.engine.generate_reading_cache, service.tutor.Tutor._cloze):
    - none missing: the request's own log-probabilities;
    - one missing, a hit of exactly the context (a context that ends on a KV-block boundary, 1 question in
      32): the first token's log-probability is read from a request of the context alone, which reads the same
      cache but must compute its last position, and asks vLLM for those tokens (`logprob_token_ids`);
    - more (options that share leading tokens across a block boundary, rare): scored again without the cache.
    Measured bit-identical to scoring every position without the cache (docs/evaluation.md)."""
    return max(0, num_cached_tokens - context_length + 1)


def first_tokens_by_context(requests: Sequence[tuple[Sequence[int], int]],
                            missing: Sequence[int]) -> dict[tuple[int, ...], list[int]]:
    """Per distinct context among the (token ids, context length) requests that lack exactly their first
    continuation log-probability (continuation_positions_missing == 1), the first tokens to ask for, sorted: one
    request of that context supplies them all."""
    wanted: dict[tuple[int, ...], set[int]] = {}
    for (ids, n), lacking in zip(requests, missing, strict=True):
        if lacking == 1:
            wanted.setdefault(tuple(ids[:n]), set()).add(ids[n])
    return {context: sorted(tokens) for context, tokens in wanted.items()}


# Methods and calibration ---------------------------------------------------------------------------------
METHODS = ("auto", "letter", "cloze", "explain")
# What `auto` may resolve to: evals/calibration.py fits one candidate per name (a unit test keeps them equal).
MIN_TEMPERATURE = 1e-6
AUTO_METHODS = ("letter", "letter_debiased", "cloze", "cloze_norm", "cloze_pmi", "combined")
# The per-option scores a calibrated `auto` may combine: the constrained letter's log-probability (with the
# position prior removed), the option text's log-likelihood, that log-likelihood per character (lm-eval's
# acc_norm), and the option text's log-likelihood without the question (answer_prior).
FEATURES = ("letter", "cloze", "cloze_norm", "answer_prior")


# Which benchmark a question reads like, as one more thing the sharpness reads: ARC-Easy's questions are answered
# right about 57% of the time and ARC-Challenge's, MMLU's and OpenBookQA's about a third, yet their scores look
# alike, so one shared sharpness made the tutor modest on the easy ones (docs/evaluation.md, "Which set a question
# reads like"). The first class is the reference the features are log-odds against.
QUESTION_DOMAINS = ("arc_challenge", "arc_easy", "openbookqa", "mmlu")
DOMAIN_FEATURES = tuple(f"domain_{name}" for name in QUESTION_DOMAINS[1:])


def domain_text(q: MCQuestion) -> str:
    """What the question-domain head embeds: the stem and the options, one a line (not the passage)."""
    return "\n".join([q.question, *q.options])


class QuestionDomain(BaseModel):
    """A multinomial logistic regression over the question's all-MiniLM-L6-v2 embedding (`domain_text`,
    normalized): the probability it comes from each of QUESTION_DOMAINS. Fitted on training splits only
    (evals/calibration.py: fit_question_domain); plain JSON, so loading a record runs no code."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN weight would read as the clamp's e^50
    encoder: str = ENCODER_NAME
    classes: list[str]
    coef: list[list[float]]
    intercept: list[float]
    fitted: dict[str, Any] = {}  # the splits and how many questions of each, the regularization

    @model_validator(mode="after")
    def _shapes(self) -> QuestionDomain:
        check_head(self.encoder, self.classes, QUESTION_DOMAINS, self.coef, self.intercept)
        return self

    def probabilities(self, embeddings: Sequence[Sequence[float]]) -> list[list[float]]:
        """Per embedding, the classes' probabilities (softmax of the linear scores, as scikit-learn's
        LogisticRegression.predict_proba computes them)."""
        out = []
        for row in embeddings:
            logits = [b + sum(w * x for w, x in zip(weights, row, strict=True))
                      for weights, b in zip(self.coef, self.intercept, strict=True)]
            out.append([math.exp(v) for v in log_softmax(logits)])
        return out

    def read(self, encoder: Any, questions: Sequence[MCQuestion], progress: bool = False) -> list[list[float]]:
        """Per question, the classes' probabilities from its `domain_text` embedded by `encoder`: the one path the
        service and the evals both take, so both apply one head to one text."""
        return self.probabilities(embed(encoder, [domain_text(q) for q in questions], progress=progress).tolist())


class MCQCalibration(BaseModel):
    """What `zephyr eval calibrate` fitted for one registry model on validation splits, kept in its zephyr.json.

    `auto` scores option i as softmax_i(sum_f weights[f] * feature_f(i)); a single method with a temperature T is
    the weight 1/T on its one feature. `letter_prior[k]` is the mean letter distribution over validation questions
    with k options; its log is subtracted from the letter feature (contextual calibration)."""

    # A NaN weight would make every `auto` answer fail, and a NaN in the scaling every confidence 1.0: refused here.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    method: str  # what `auto` resolves to: one of AUTO_METHODS
    weights: dict[str, float]
    letter_prior: dict[str, list[float]] = {}
    temperatures: dict[str, float] = {}  # per single method, applied when a client names that method
    scaling: dict[str, float] = {}  # CONFIDENCE_FEATURES -> weight: how sharp `auto` is for each question
    validation: dict[str, Any] = {}  # splits, sizes, and each candidate's accuracy / NLL / ECE
    # The cue the answer prior was scored after when the weights were fitted; the service asks with the same one.
    answer_prior_context: str = Field(default=LEGACY_ANSWER_PRIOR_CONTEXT, min_length=1,
                                      max_length=ANSWER_PRIOR_CONTEXT_MAX_CHARS)
    # Solved examples scored before every cloze and answer-prior prompt (render_demonstrations; none in older
    # records), and where they came from.
    demonstrations: str = Field(default="", max_length=DEMONSTRATIONS_MAX_CHARS)
    demonstrations_source: dict[str, Any] = {}
    # The dtype the engine computed the validation scores in (None in older records): the weights fit those
    # numerics, so the server warns when it serves in another (docs/operations.md, "ZEPHYR_DTYPE").
    dtype: str | None = Field(default=None, max_length=32)
    # The head DOMAIN_FEATURES read (None in records without them): the service embeds each question to apply it.
    question_domain: QuestionDomain | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("answer_prior_context")
    @classmethod
    def _a_cue(cls, cue: str) -> str:
        if problem := answer_prior_context_problem(cue):
            raise ValueError(problem)
        return cue

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in AUTO_METHODS:  # what a response reports as `auto`'s method
            raise ValueError(f"method must be one of {', '.join(AUTO_METHODS)}; got {method!r}")
        return method

    @field_validator("weights")
    @classmethod
    def _known_features(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = set(weights) - set(FEATURES)
        if unknown or not any(weights.values()):
            # all zero: the server started and every `auto` answer was a 500 ("no feature has a weight")
            raise ValueError(f"weights must give a weight other than 0 to some of {', '.join(FEATURES)}; got "
                             f"{weights}")
        return weights

    @field_validator("temperatures")
    @classmethod
    def _positive_temperatures(cls, temperatures: dict[str, float]) -> dict[str, float]:
        # A named method keeps its answer: a temperature at or below zero would turn its ranking around, and one
        # near zero overflows 1/T (every option's logit -inf, every request a 500).
        # `auto` has none: it is the record's own combination and sharpness.
        named = [m for m in METHODS if m != "auto"]
        if bad := {k: v for k, v in temperatures.items() if k not in named or not v >= MIN_TEMPERATURE}:
            raise ValueError(f"temperatures are per named method ({', '.join(named)}) and at least "
                             f"{MIN_TEMPERATURE:g}; got {bad}")
        return temperatures

    @field_validator("letter_prior")
    @classmethod
    def _priors_over_their_letters(cls, priors: dict[str, list[float]]) -> dict[str, list[float]]:
        # A row of another length than its key was skipped without a word, serving undebiased letters.
        if bad := {k: v for k, v in priors.items()
                   if not k.isdigit() or len(v) != int(k) or not all(math.isfinite(p) and p > 0 for p in v)}:
            raise ValueError(f"letter_prior maps an option count to that many positive probabilities; got {bad}")
        return priors

    @field_validator("scaling")
    @classmethod
    def _known_confidence_features(cls, scaling: dict[str, float]) -> dict[str, float]:
        unknown = set(scaling) - set(CONFIDENCE_FEATURES)
        if unknown:
            raise ValueError(f"scaling may name {', '.join(CONFIDENCE_FEATURES)}; got {sorted(unknown)}")
        return scaling

    @property
    def reads_question_domain(self) -> bool:
        """Whether `auto`'s sharpness reads which set a question reads like: the service then embeds each one."""
        return any(self.scaling.get(f) for f in DOMAIN_FEATURES)

    @model_validator(mode="after")
    def _domain_head_with_domain_features(self) -> MCQCalibration:
        if self.reads_question_domain and self.question_domain is None:
            raise ValueError(f"scaling weighs {', '.join(DOMAIN_FEATURES)} but the record has no question_domain "
                             "head to compute them")
        return self


@dataclass(frozen=True)
class OptionScores:
    """The raw per-option scores of one question; None where a method was not run."""

    letter: list[float] | None = None  # letter log-probabilities renormalized over the options
    cloze: list[float] | None = None  # the option text's summed log-likelihood
    cloze_norm: list[float] | None = None  # the same per character of the option text
    option_chars: list[int] | None = None  # each option's length in characters
    answer_prior: list[float] | None = None  # the option text's log-likelihood after the answer cue alone
    support: bool = False  # the question came with a passage
    domain: list[float] | None = None  # QuestionDomain's probabilities, in QUESTION_DOMAINS' order


def cloze_scores(options: Sequence[str], loglikelihoods: Sequence[float], support: bool = False) -> OptionScores:
    """lm-eval's acc scores the summed log-likelihood, acc_norm the same divided by the option's length in
    characters (the continuation's delimiter not counted)."""
    lls = [float(x) for x in loglikelihoods]
    chars = [max(1, len(o)) for o in options]
    return OptionScores(cloze=lls, cloze_norm=[ll / n for ll, n in zip(lls, chars, strict=True)], option_chars=chars,
                        support=support)


# Question-level observables that set how sharp a calibrated `auto` is for one question (its temperature is
# exp(-sum scaling[f] * f)): a passage, whether the summed and per-character cloze agree, option lengths, how
# spread the options' scores are, the per-character margin, the option count, and how predictable the options
# are after the question at all (their mean per-character log-likelihood: options the model finds familiar come
# with questions it answers more often). They scale every option alike, so the answer never changes; only how
# sure it is does. A record fitted before a feature existed simply has no weight for it.
SCORE_CONFIDENCE_FEATURES = ("bias", "support", "cloze_agree", "log_option_chars", "log_cloze_spread",
                             "norm_margin", "options", "mean_norm")
# ... and, where the record has a QuestionDomain head, which set the question reads like: log P(set) / P(ARC-Challenge).
CONFIDENCE_FEATURES = SCORE_CONFIDENCE_FEATURES + DOMAIN_FEATURES


def confidence_features(scores: OptionScores) -> dict[str, float]:
    if scores.cloze is None or scores.cloze_norm is None or scores.option_chars is None:
        raise ValueError("confidence features need the cloze scores")
    # Over the options with finite scores: one impossible option (-inf) must not make every feature NaN, and it
    # never wins the argmax the agreement reads.
    finite = [i for i, (c, n) in enumerate(zip(scores.cloze, scores.cloze_norm, strict=True))
              if math.isfinite(c) and math.isfinite(n)]
    if not finite:
        raise ValueError("no option has a finite score")
    cloze, norm = [scores.cloze[i] for i in finite], [scores.cloze_norm[i] for i in finite]
    mean = sum(cloze) / len(cloze)
    spread = math.sqrt(sum((x - mean) ** 2 for x in cloze) / len(cloze))
    norm_probs = [0.0, *sorted(math.exp(x) for x in log_softmax(norm))]
    features = {"bias": 1.0, "support": float(scores.support),
                "cloze_agree": float(cloze.index(max(cloze)) == norm.index(max(norm))),
                "log_option_chars": math.log(1 + sum(scores.option_chars) / len(scores.option_chars)),
                "log_cloze_spread": math.log(spread + 1e-3), "norm_margin": norm_probs[-1] - norm_probs[-2],
                "options": float(len(scores.cloze)), "mean_norm": sum(norm) / len(norm)}
    if scores.domain is not None:
        if len(scores.domain) != len(QUESTION_DOMAINS):
            raise ValueError(f"domain needs one probability per class of {', '.join(QUESTION_DOMAINS)}")
        reference = math.log(max(scores.domain[0], 1e-12))
        features.update({name: math.log(max(p, 1e-12)) - reference
                         for name, p in zip(DOMAIN_FEATURES, scores.domain[1:], strict=True)})
    return features


def log_softmax(values: Sequence[float]) -> list[float]:
    # A weighted sum of scores where two are -inf (-inf * w + -inf * -w') is NaN: that option is impossible.
    values = [-math.inf if math.isnan(v) else v for v in values]
    peak = max(values)
    if not math.isfinite(peak):
        raise ValueError("no option has a finite score")
    log_total = peak + math.log(sum(math.exp(v - peak) for v in values))
    return [v - log_total for v in values]


def debiased_letter(calibration: MCQCalibration | None, letter: Sequence[float]) -> list[float]:
    """Letter scores less the letter-position prior measured for that many options. A count validation never had
    (a true/false question against 3-5 options) takes the first letters of the nearest larger count's prior,
    renormalized: the weights were fitted on debiased scores, and raw ones kept the bias (A over B) whole."""
    priors = calibration.letter_prior if calibration else {}
    k = len(letter)
    prior = priors.get(str(k))
    if prior is None:
        larger = sorted(int(n) for n in priors if int(n) > k)
        if not larger:
            return list(letter)
        head = priors[str(larger[0])][:k]
        prior = [p / sum(head) for p in head]
    return [x - math.log(max(p, 1e-9)) for x, p in zip(letter, prior, strict=True)]


def feature_values(scores: OptionScores, feature: str, calibration: MCQCalibration | None) -> list[float]:
    values = getattr(scores, feature)
    if values is None:
        raise ValueError(f"the {feature} scores were not computed")
    return debiased_letter(calibration, values) if feature == "letter" else list(values)


def combined_logits(scores: OptionScores, weights: Mapping[str, float],
                    calibration: MCQCalibration | None = None) -> list[float]:
    total: list[float] | None = None
    for feature, weight in weights.items():
        if not weight:
            continue
        # An option with a score that is not finite is impossible, whatever the weight's sign: -inf times the answer
        # prior's negative weight would otherwise make it certain.
        values = [weight * v if math.isfinite(v) else -math.inf
                  for v in feature_values(scores, feature, calibration)]
        total = values if total is None else [a + b for a, b in zip(total, values, strict=True)]
    if total is None:
        raise ValueError("no feature has a weight")
    return total


def sharpness(scores: OptionScores, scaling: Mapping[str, float]) -> float:
    """exp(sum scaling[f] * f(question)): 1 without scaling."""
    if not scaling:
        return 1.0
    features = confidence_features(scores)
    if missing := [f for f, w in scaling.items() if w and f not in features]:
        raise ValueError(f"the sharpness reads {', '.join(missing)}: the question's domain was not computed")
    total = sum(w * features[f] for f, w in scaling.items() if w)
    if not math.isfinite(total):  # min(50, nan) is 50: a confidence of 1.0 that nothing supports
        raise ValueError(f"the sharpness is not finite ({total}): a scaling weight or a feature is")
    return math.exp(max(-50.0, min(50.0, total)))


def combine(scores: OptionScores, weights: Mapping[str, float], calibration: MCQCalibration | None = None,
            letters: str | None = None, scaling: Mapping[str, float] | None = None) -> tuple[dict[str, float], str]:
    """Probabilities over the options from weighted per-option scores, sharpened per question by `scaling`
    (summing to 1), and the best letter: the argmax of the unscaled combined scores (ties to the earlier letter),
    so that the sharpness never changes the answer, even where a tiny factor makes the scaled scores (and so the
    probabilities) equal in floating point."""
    logits = combined_logits(scores, weights, calibration)
    letters = letters or LETTERS[: len(logits)]
    factor = sharpness(scores, scaling or {})
    probabilities, _ = letter_distribution(letters, [factor * x for x in logits])
    _, answer = letter_distribution(letters, logits)
    return probabilities, answer


@dataclass(frozen=True)
class Plan:
    """What a request's method computes: the method reported, the feature weights, and whether a calibration
    record shaped them (the letter's position prior is removed only where the record chose it, in `auto`)."""

    method: str
    weights: dict[str, float]
    calibration: MCQCalibration | None = None
    scaling: dict[str, float] = field(default_factory=dict)  # `auto` only: the record's per-question sharpness
    # The solved examples before every cloze and answer-prior prompt: the record's (in `auto` and `cloze`, with or
    # without a temperature, so that a model's cloze is one computation), none without a record.
    demonstrations: str = ""

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def needs_letter(self) -> bool:
        return bool(self.weights.get("letter"))

    @property
    def needs_cloze(self) -> bool:
        return bool(self.weights.get("cloze") or self.weights.get("cloze_norm") or self.scaling
                    or self.needs_answer_prior)

    @property
    def needs_domain(self) -> bool:
        """Whether the sharpness reads which set the question reads like (`auto` on a record that reads it)."""
        return bool(self.scaling) and self.calibration is not None and self.calibration.reads_question_domain

    @property
    def needs_answer_prior(self) -> bool:
        return bool(self.weights.get("answer_prior"))

    @property
    def answer_prior_context(self) -> str:
        """The cue the record's weights were fitted on; the current one for a model without a record."""
        return self.calibration.answer_prior_context if self.calibration else ANSWER_PRIOR_CONTEXT

    def distribution(self, scores: OptionScores, letters: str | None = None) -> tuple[dict[str, float], str]:
        prior_from = None if self.method in ("letter", "explain") else self.calibration
        return combine(scores, self.weights, prior_from, letters, self.scaling)


def plan(method: str, calibration: MCQCalibration | None) -> Plan:
    """`auto` is the record's choice, or plain cloze for a model without one. A named method is not the record's
    combination: the record rescales its probabilities by the temperature fitted for it, and `cloze` is asked after
    the record's demonstrations (the prompt its temperature was fitted on). `explain` reads its letter like
    `letter`."""
    if method not in METHODS:
        raise MCQFormatError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}", "method")
    if method == "auto":
        if calibration is None:
            return Plan("cloze", {"cloze": 1.0})
        return Plan(calibration.method, dict(calibration.weights), calibration, dict(calibration.scaling),
                    calibration.demonstrations)
    feature = "letter" if method == "explain" else method
    shown = calibration.demonstrations if calibration and method == "cloze" else ""
    temperature = calibration.temperatures.get(method) if calibration else None
    if temperature:
        return Plan(method, {feature: 1.0 / temperature}, calibration, demonstrations=shown)
    return Plan(method, {feature: 1.0}, demonstrations=shown)


def read_arc_jsonl(path: Path) -> list[MCQuestion]:
    """Questions from an ARC-format JSON Lines file (`{"question": {"stem", "choices": [{"text"}]}}`); ones
    that cannot be rendered are skipped."""
    items = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():  # a trailing blank line is no question
                continue
            record = json.loads(line)["question"]
            try:
                items.append(MCQuestion.build(record["stem"], [choice["text"] for choice in record["choices"]]))
            except MCQFormatError:
                continue
    return items
