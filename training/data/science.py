"""Verifiable science preference data: the answer key, not a judge, says which reply is better.

For each MCQ training question (never a test split) the current model, in vLLM offline batch mode:

1. writes `k` tutor explanations (the service's `explain` prompt, sampled), and each explanation's final letter is
   read exactly as `POST /mcq` with `explain` reads it (the prompt continues with "Answer:" and the next token is
   restricted to the option letters). An explanation is correct when that letter is the key.
2. gives its letter distribution for the direct prompt ("Answer with the letter..."), the prompt `POST /mcq`
   and the letter-format evals use.

Pairs (DPO): an explanation ending in the key against one ending in a wrong letter, where the k samples hold both
("explain" pairs); and the key's letter against the letter the model itself ranks highest among the wrong ones
("direct" pairs: the exact token the endpoint reads, against a wrong letter drawn uniformly, or the model's own
most likely mistake with `negatives="mistake"`).
Unpaired examples (KTO): every labelled explanation, and the key against that mistake. All prompts are rendered
by `zephyr.mcq`, so training sees the text serving and evals send."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from zephyr import mcq
from zephyr.schemas import KTOExample, MCQItem, Message, PreferencePair

SOURCE = "zephyr-science"


@dataclass
class Sample:
    text: str
    letter: str


@dataclass
class ScienceStats:
    questions: int = 0
    skipped: int = 0  # options the MCQ format refuses (duplicates)
    cut_off: int = 0  # explanations max_tokens cut before their answer line: not used
    explanations: int = 0
    correct_explanations: int = 0
    explain_pairs: int = 0
    direct_pairs: int = 0
    direct_correct: int = 0  # questions the model already answers right in the direct format
    letters: Counter = field(default_factory=Counter)  # final letters of the explanations (the model's bias)

    def rows(self) -> list[tuple[str, str]]:
        share = self.correct_explanations / self.explanations if self.explanations else 0.0
        direct = self.direct_correct / self.questions if self.questions else 0.0
        return [("questions", str(self.questions)), ("skipped (bad options)", str(self.skipped)),
                ("explanations sampled", str(self.explanations)),
                ("explanations cut off at max_tokens (left out)", str(self.cut_off)),
                ("explanations ending in the key", f"{self.correct_explanations} ({share:.1%})"),
                ("direct prompt: key ranked first", f"{self.direct_correct} ({direct:.1%})"),
                ("explain pairs", str(self.explain_pairs)), ("direct pairs", str(self.direct_pairs)),
                ("final letters", ", ".join(f"{k}:{v}" for k, v in sorted(self.letters.items())))]


def _messages(raw: list[dict[str, str]]) -> list[Message]:
    return [Message(role=m["role"], content=m["content"]) for m in raw]


def _reply(text: str) -> list[Message]:
    return [Message(role="assistant", content=text)]


def explained(text: str, letter: str) -> str:
    """An explanation as the tutor writes it in full: reasoning, then the cue and the letter /mcq reads."""
    return f"{text.rstrip()}{mcq.FINAL_ANSWER_CUE} {letter}"


def _letter_params(tokenizer: Any, count: int, leading_space: bool) -> Any:
    from vllm import SamplingParams

    ids = mcq.letter_token_ids(tokenizer, count, leading_space=leading_space)
    return SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=ids, logprob_token_ids=ids,
                          detokenize=False)


def _letter_probabilities(output: Any, params: Any, count: int) -> dict[str, float]:
    logprobs = output.outputs[0].logprobs[0]
    letters = mcq.LETTERS[:count]
    probabilities, _ = mcq.letter_distribution(letters, [logprobs[t].logprob for t in params.allowed_token_ids])
    return probabilities


def sample(llm: Any, tokenizer: Any, items: list[MCQItem], *, k: int, explain_items: int | None, temperature: float,
           max_tokens: int) -> tuple[dict[str, list[Sample]], dict[str, dict[str, float]], int, int]:
    """Explanations (for the first `explain_items` questions) and direct-prompt letter distributions (for all), the
    number of questions the MCQ format refused and of explanations left out because max_tokens cut them off.
    Explanations are drawn as `/mcq` with `explain` draws them: stopped at the first answer line, stripped, then
    the letter read after the cue; one cut off would be labelled with a letter read mid-thought."""
    from vllm import SamplingParams, TokensPrompt

    questions: dict[str, mcq.MCQuestion] = {}
    skipped = 0
    for item in items:
        try:
            questions[item.id] = mcq.MCQuestion.build(item.question, item.options)
        except mcq.MCQFormatError:
            skipped += 1
    ids = list(questions)

    # The direct prompt: the model's own letter distribution, one forward pass per question.
    direct_params = [_letter_params(tokenizer, len(questions[i].options), leading_space=False) for i in ids]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=mcq.encode_prompt(tokenizer, questions[i])) for i in ids],
                           direct_params, use_tqdm=True)
    direct = {i: _letter_probabilities(o, p, len(questions[i].options))
              for i, o, p in zip(ids, outputs, direct_params, strict=True)}

    explain_ids = ids[:explain_items] if explain_items is not None else ids
    samples: dict[str, list[Sample]] = {}
    cut_off = 0
    if explain_ids and k:
        # No per-request seed: vLLM's CPU sampler rejects seeded generators; the engine's seed fixes the draw.
        params = SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, stop=list(mcq.EXPLAIN_STOP))
        prompts = [TokensPrompt(prompt_token_ids=mcq.encode_prompt(tokenizer, questions[i], explain=True))
                   for i in explain_ids]
        outputs = llm.generate(prompts, params, use_tqdm=True)
        texts = {i: [c.text.strip() for c in o.outputs if c.finish_reason == "stop"]
                 for i, o in zip(explain_ids, outputs, strict=True)}
        cut_off = sum(c.finish_reason != "stop" for o in outputs for c in o.outputs)
        # Each explanation's final letter, read as /mcq reads it after reasoning (" A", " B", ... after "Answer:").
        flat = [(i, text) for i in explain_ids for text in texts[i] if text]
        letter_params = [_letter_params(tokenizer, len(questions[i].options), leading_space=True) for i, _ in flat]
        reads = llm.generate([TokensPrompt(prompt_token_ids=mcq.encode_prompt(tokenizer, questions[i], explain=True,
                                                                              reasoning=text)) for i, text in flat],
                             letter_params, use_tqdm=True)
        for (i, text), output, param in zip(flat, reads, letter_params, strict=True):
            probabilities = _letter_probabilities(output, param, len(questions[i].options))
            samples.setdefault(i, []).append(Sample(text, max(probabilities, key=probabilities.__getitem__)))
    return samples, direct, skipped, cut_off


NEGATIVES = ("balanced", "mistake")


def build(items: list[MCQItem], samples: dict[str, list[Sample]], direct: dict[str, dict[str, float]],
          seed: int = 0, negatives: str = "balanced") -> tuple[list[PreferencePair], list[KTOExample], ScienceStats]:
    """Pairs and unpaired examples from sampled explanations and direct letter distributions.

    `negatives` picks the rejected letter of a direct pair. "mistake" is the wrong letter the model ranks
    highest; measured here, that teaches a shortcut: the model's favourite letters (B, A) are nearly always the
    rejected ones, so DPO learns "never B or A" and answers D to everything (docs/training.md). "balanced"
    draws a wrong letter uniformly, so no letter is preferred or rejected more often than the keys make it."""
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, not {negatives!r}")
    rng = random.Random(seed)
    stats = ScienceStats(questions=len(direct))
    pairs: list[PreferencePair] = []
    unpaired: list[KTOExample] = []
    for item in items:
        if item.id not in direct:
            continue
        question = mcq.MCQuestion.build(item.question, item.options)
        meta = {"question_id": item.id, "key": item.answer}
        explain_prompt = _messages(mcq.render_messages(question, explain=True))
        found = samples.get(item.id, [])
        stats.explanations += len(found)
        stats.letters.update(s.letter for s in found)
        right = [s for s in found if s.letter == item.answer]
        wrong = [s for s in found if s.letter != item.answer]
        stats.correct_explanations += len(right)
        for s in found:
            unpaired.append(KTOExample(prompt=explain_prompt, completion=_reply(explained(s.text, s.letter)),
                                       label=s.letter == item.answer, meta={**meta, "format": "explain"}))
        if right and wrong:
            chosen, rejected = rng.choice(right), rng.choice(wrong)
            pairs.append(PreferencePair(prompt=explain_prompt, chosen=_reply(explained(chosen.text, chosen.letter)),
                                        rejected=_reply(explained(rejected.text, rejected.letter)), source=SOURCE,
                                        meta={**meta, "format": "explain", "rejected_letter": rejected.letter}))
            stats.explain_pairs += 1

        distribution = direct[item.id]
        stats.direct_correct += max(distribution, key=distribution.__getitem__) == item.answer
        wrong_letters = [letter for letter in distribution if letter != item.answer]
        mistake = max(wrong_letters, key=distribution.__getitem__) if negatives == "mistake" else \
            rng.choice(wrong_letters)
        direct_prompt = _messages(mcq.render_messages(question))
        pair_meta = {**meta, "format": "direct", "rejected_letter": mistake,
                     "key_probability": round(distribution[item.answer], 4)}
        pairs.append(PreferencePair(prompt=direct_prompt, chosen=_reply(item.answer), rejected=_reply(mistake),
                                    source=SOURCE, meta=pair_meta))
        unpaired.append(KTOExample(prompt=direct_prompt, completion=_reply(item.answer), label=True, meta=pair_meta))
        unpaired.append(KTOExample(prompt=direct_prompt, completion=_reply(mistake), label=False, meta=pair_meta))
        stats.direct_pairs += 1
    rng.shuffle(pairs)
    rng.shuffle(unpaired)
    return pairs, unpaired, stats


# The reasoning of a "restate" reply: the chosen option's text, word for word, before the cue and the letter.
RESTATE = "The correct option is {option}."


def restated(option: str, letter: str) -> str:
    """A tutor reply that names its answer's text first, then (after the cue /mcq appends) the letter."""
    return explained(RESTATE.format(option=option.strip().rstrip(".")), letter)


def restate_pairs(items: list[MCQItem], seed: int = 0) -> tuple[list[PreferencePair], Counter]:
    """Explain-format pairs that need no sampling: the reply restates the key's text and ends in its letter.

    Measured (docs/training.md): this model cannot map a question to its key's letter in one step, but once the
    option's text stands in the reply it learns within a hundred steps to copy the letter printed before that
    text in the prompt. So the reply names the option first. Each question's options are shuffled (seeded) so
    the key's letter is uniform. Half of the rejected replies restate a wrong option and end in its letter
    (which option is right); the other half restate the key but end in a wrong letter (which letter goes with
    the text). Returns the pairs and how often each kind of rejection was drawn."""
    rng = random.Random(seed)
    kinds: Counter = Counter()
    pairs: list[PreferencePair] = []
    for item in items:
        order = list(range(len(item.options)))
        rng.shuffle(order)
        options = [item.options[i] for i in order]
        key = order.index(mcq.LETTERS.index(item.answer))
        question = mcq.MCQuestion.build(item.question, options)
        letters = question.letters
        wrong = rng.choice([i for i in range(len(options)) if i != key])
        kind = rng.choice(("wrong option", "wrong letter"))
        kinds[kind] += 1
        rejected_text = options[wrong] if kind == "wrong option" else options[key]
        pairs.append(PreferencePair(
            prompt=_messages(mcq.render_messages(question, explain=True)),
            chosen=_reply(restated(options[key], letters[key])),
            rejected=_reply(restated(rejected_text, letters[wrong])), source=SOURCE,
            meta={"question_id": item.id, "key": letters[key], "format": "restate", "rejected": kind,
                  "rejected_letter": letters[wrong]}))
    rng.shuffle(pairs)  # sources mixed, so a recipe's `limit` takes a sample of all of them
    return pairs, kinds
