"""Chat-answer pairs: the tutor's own chat answers, labelled by whether they are right.

Each training question is asked as a student asks in chat, and as the text suite asks SciQ (the tutoring system
prompt, then the bare question, no options). The current model samples `k` answers in vLLM offline batch mode (or
through transformers on a GPU machine without vLLM), and each answer is read against the options it never saw
(`offline.benchmarks.answer_verdict`, the text suite's `names_key` and `names_distractor`): right names the key's
text and no distractor's, wrong a distractor's and not the key's. A pair's chosen reply is a right answer that ended
on its own and does not loop; its rejected reply is a wrong answer, or, where the samples hold none, one that names
no option (a reply that never commits to an answer), or (`wrong-or-swapped`) the chosen reply itself with the key's
text swapped for a distractor's: the same words, committed to a wrong option, so the pair teaches which option to
name rather than to name one at all.

The pairs are on-policy, so DPO moves the model towards answers it already gives sometimes, in its own words and
length, rather than towards a template. Questions whose stem points at options the student would not see in chat
("which of the following", a diagram) are left out: no answer to them can be read. The filter is a word list and
errs on leaving out (it also drops "table salt" and "above sea level").
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError

from offline.benchmarks import ANSWER_VERDICTS, answer_verdict, normalize_words
from training.data.cloze import usable
from zephyr import mcq
from zephyr.prompts import encode_chat, with_system_prompt
from zephyr.schemas import MCQItem, Message, PreferencePair, write_jsonl
from zephyr.textquality import loops

SOURCE = "zephyr-chat-answers"
# Stems that cannot be answered without the options or a figure.
_NEEDS_OPTIONS = re.compile(r"\b(following|these|below|above|shown|diagram|table|graph|picture|statements?|"
                            r"illustrat\w*)\b", re.IGNORECASE)
REJECTED = ("wrong", "wrong-or-neither", "wrong-or-swapped")
_VOWEL = re.compile(r"[aeiou]", re.IGNORECASE)  # "an" before it; a spelling rule, good enough for option texts
_ARTICLE = re.compile(r"^(an?|the)\s+", re.IGNORECASE)
_SENTENCE_START = re.compile(r"(^|[.!?]\s+|\n\s*)[\"'(\[]?$")


@dataclass
class ChatSample:
    text: str
    ended: bool  # stopped on its own, not at the token limit


@dataclass
class ChatAnswerStats:
    questions: int = 0
    skipped: int = 0  # options the MCQ format refuses (duplicates): no verdict is well defined
    needs_options: int = 0  # left out: the stem points at options or a figure
    answers: int = 0  # sampled, empty ones included
    verdicts: Counter = field(default_factory=Counter)
    questions_with_right: int = 0
    pairs: Counter = field(default_factory=Counter)  # by the rejected reply's verdict
    unswappable: int = 0  # a right answer, nothing sampled to reject, and no distractor swap that reads wrong

    def rows(self) -> list[tuple[str, str]]:
        share = {v: f"{n} ({n / self.answers:.1%})" if self.answers else "0" for v, n in self.verdicts.items()}
        return [("questions", str(self.questions)), ("skipped (bad options)", str(self.skipped)),
                ("left out (the stem points at options or a figure)", str(self.needs_options)),
                ("answers sampled", str(self.answers)),
                *((f"answers {verdict}", share.get(verdict, "0")) for verdict in ANSWER_VERDICTS),
                ("questions with a right answer", str(self.questions_with_right)),
                ("pairs against a wrong answer", str(self.pairs["wrong"])),
                ("pairs against an answer naming no option", str(self.pairs["neither"])),
                ("pairs against the chosen answer with a distractor swapped in", str(self.pairs["swapped"])),
                ("no pair: no distractor swapped in reads wrong", str(self.unswappable))]


def askable(items: list[MCQItem]) -> tuple[list[MCQItem], int, int]:
    """The questions a student could ask in chat as they are: options the MCQ format accepts (so a verdict is well
    defined), no reference to options or figures. Returns them, how many the format refuses, and how many point at
    options or a figure."""
    accepted, refused = usable(items)
    kept = [item for item, _ in accepted if not _NEEDS_OPTIONS.search(item.question)]
    return kept, refused, len(accepted) - len(kept)


def conversation(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat a student sends: the service's system prompt (when enabled), then the bare question."""
    return with_system_prompt([{"role": "user", "content": question}], system_prompt or None)


def sample(llm: Any, tokenizer: Any, items: list[MCQItem], system_prompt: str | None, *, k: int,
           temperature: float, top_p: float, max_tokens: int) -> dict[str, list[ChatSample]]:
    """`k` sampled chat answers per question, rendered with the chat template as the service renders them."""
    from vllm import SamplingParams, TokensPrompt

    # No per-request seed: vLLM's CPU sampler rejects seeded generators; the engine's seed fixes the draw.
    params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    prompts = [TokensPrompt(prompt_token_ids=encode_chat(tokenizer, conversation(item.question, system_prompt)))
               for item in items]
    outputs = llm.generate(prompts, params, use_tqdm=True)
    return {item.id: [ChatSample(c.text.strip(), c.finish_reason == "stop") for c in output.outputs]
            for item, output in zip(items, outputs, strict=True)}


def sample_transformers(model_path: Any, items: list[MCQItem], system_prompt: str | None, *, k: int,
                        temperature: float, top_p: float, max_tokens: int, batch_size: int | None = None,
                        seed: int = 0) -> dict[str, list[ChatSample]]:
    """The same draw through transformers' `generate`, for a machine without vLLM (a GPU box: vLLM's CPU build does
    not run there). bf16 on CUDA, float32 on a CPU. The same prompts and stop tokens, and none of the checkpoint's
    own generation defaults (vLLM with explicit parameters applies none), so the same distribution; not the same
    draws. `batch_size` rows at once: 512 on a GPU, 64 on a CPU (each row's KV cache is about 14 MB in float32)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = batch_size or (512 if device == "cuda" else 64)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if device == "cuda" else
                                                 torch.float32).to(device).eval()
    configured = model.generation_config.eos_token_id
    # vLLM stops on the tokenizer's end token and the generation config's, as here.
    stops = ({*(configured if isinstance(configured, list) else [configured])} | {tokenizer.eos_token_id}) - {None}
    if not stops:
        raise ValueError(f"{model_path} names no end-of-sequence token: an answer could never end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    prompts = [encode_chat(tokenizer, conversation(item.question, system_prompt)) for item in items]
    rows = sorted((i for i in range(len(items)) for _ in range(k)), key=lambda i: len(prompts[i]))  # less padding
    torch.manual_seed(seed)
    found: dict[str, list[ChatSample]] = {item.id: [] for item in items}
    for start in tqdm(range(0, len(rows), batch_size), desc="chat answers", unit="batch"):
        batch = rows[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=top_p, top_k=0, min_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                 max_new_tokens=max_tokens, eos_token_id=sorted(stops), pad_token_id=pad)
        for i, row in zip(batch, out[:, width:].tolist(), strict=True):
            end = next((n for n, token in enumerate(row) if token in stops), None)
            text = tokenizer.decode(row if end is None else row[:end], skip_special_tokens=True).strip()
            found[items[i].id].append(ChatSample(text, end is not None))
    return found


def swap_key(answer: str, options: list[str], key: int, rng: random.Random) -> str | None:
    """`answer` with every mention of the key's text (whole words, case and punctuation between words aside, as
    `answer_verdict` reads it) replaced by a distractor's. The distractors are tried in random order; the first swap
    that reads `wrong` is returned, None if none does (a distractor whose words hold the key's, or an answer that
    never names the key). The swap reads as written: a distractor with its own article ("the Moon") replaces the
    mention's article too, "a"/"an" before the mention follow the new word, a mention that starts a sentence starts
    it with a capital, and options capitalised as list entries ("Balance") are written in the answer's case ("a
    balance"); an acronym keeps its capitals."""
    words = normalize_words(options[key])
    if not words:
        return None
    # A number is not named inside another ("5" in "5.5" or "-5").
    before = r"(?<!\d[.,])(?<!-)" if words[0][0].isdigit() else ""
    after = r"(?![.,]\d)" if words[-1][-1].isdigit() else ""
    mention = re.compile(rf"(?<![^\W_]){before}(?:(an?|the)(\s+))?(" + r"[\W_]+".join(map(re.escape, words)) +
                         rf")(?![^\W_]){after}", re.IGNORECASE)
    listed = options[key][:1].isupper() and not _acronym(options[key])

    def swap_in(text: str) -> Any:
        def replace(match: re.Match[str]) -> str:
            article, space, said = match.groups()
            if article and _ARTICLE.match(text):  # the distractor's own article takes the answer's place
                return (text[:1].upper() if article[:1].isupper() else text[:1].lower()) + text[1:]
            new = text
            if article is None and _SENTENCE_START.search(answer[:match.start()]):
                new = text[:1].upper() + text[1:]
            elif listed and said[:1].islower() and not _acronym(text):
                new = text[:1].lower() + text[1:]
            if article is None:
                return new
            fitting = article if article.lower() == "the" else "an" if _VOWEL.match(new) else "a"
            return (fitting.capitalize() if article[0].isupper() else fitting.lower()) + space + new
        return replace

    for distractor in rng.sample([i for i in range(len(options)) if i != key], len(options) - 1):
        text = options[distractor].strip().rstrip(".")
        if not normalize_words(text):
            continue
        swapped = mention.sub(swap_in(text), answer)
        if swapped != answer and answer_verdict(swapped, options, key) == "wrong":
            return swapped
    return None


def _acronym(text: str) -> bool:
    first = text.split()[0] if text.split() else ""
    return len(first) > 1 and first.isupper()


class SampledAnswer(BaseModel):
    """One sampled answer, a line of the file `write_answers` writes."""

    model_config = ConfigDict(extra="forbid")
    question_id: str
    text: str
    ended: StrictBool


def write_answers(path: Path, samples: dict[str, list[ChatSample]]) -> int:
    """Every sampled answer, one JSON line each, so pairs can be rebuilt under another rule without sampling again
    (`zephyr data chat-answers --answers-from`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, (SampledAnswer(question_id=question_id, text=sample.text, ended=sample.ended)
                              for question_id, found in samples.items() for sample in found))


def read_answers(path: Path) -> dict[str, list[ChatSample]]:
    """Answers written by `write_answers`, or the sampled replies of each pair in a file this builder wrote: both,
    except a rejected reply made by `swap_key` (not sampled). A chosen reply ended; a rejected one is only ever
    rejected, so whether it ended does not matter. Raises ValueError naming the line that is neither."""
    found: dict[str, list[ChatSample]] = {}
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    question_id, samples = _answers_of(line)
                except ValueError as exc:
                    raise ValueError(f"{path}, line {number}: neither a sampled answer (question_id, text, ended) "
                                     f"nor a chat-answer pair ({SOURCE}): {_reason(exc)}") from None
                found.setdefault(question_id, []).extend(samples)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    return found


def _reason(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        return f"{'.'.join(map(str, error['loc'])) or 'the line'}: {error['msg']}"
    return str(exc)


def _answers_of(line: str) -> tuple[str, list[ChatSample]]:
    row = json.loads(line)  # its shape says which record it is
    if isinstance(row, dict) and "question_id" in row:
        answer = SampledAnswer.model_validate(row)
        return answer.question_id, [ChatSample(answer.text, answer.ended)]
    pair = PreferencePair.model_validate(row)
    if pair.source != SOURCE or pair.meta.get("format") != "chat":
        raise ValueError(f"a pair from {pair.source!r} in format {pair.meta.get('format')!r}")
    question_id = pair.meta.get("question_id")
    if not isinstance(question_id, str):
        raise ValueError("meta.question_id must be a string")
    replies = [pair.chosen[-1].content] + ([] if pair.meta.get("rejected") == "swapped" else
                                           [pair.rejected[-1].content])
    return question_id, [ChatSample(text, True) for text in replies]


def build(items: list[MCQItem], samples: dict[str, list[ChatSample]], system_prompt: str | None, *,
          rejected: str = "wrong-or-neither", seed: int = 0) -> tuple[list[PreferencePair], ChatAnswerStats]:
    """One pair per question whose samples hold a right answer that ended and does not loop, and a rejected one:
    a wrong answer, or where none is wrong (with `rejected="wrong-or-neither"`) an answer naming no option, or
    (`"wrong-or-swapped"`) the chosen answer with a distractor's text in place of the key's."""
    if rejected not in REJECTED:
        raise ValueError(f"rejected must be one of {', '.join(REJECTED)}, not {rejected!r}")
    rng = random.Random(seed)
    stats = ChatAnswerStats(questions=len(items))
    pairs: list[PreferencePair] = []
    for item in items:
        found = samples.get(item.id, [])
        # An empty answer names no option: counted, and never a rejected reply.
        verdicts = [answer_verdict(s.text, item.options, mcq.LETTERS.index(item.answer)) for s in found]
        stats.answers += len(found)
        stats.verdicts.update(verdicts)
        right = [s for s, v in zip(found, verdicts, strict=True) if v == "right" and s.ended and not loops(s.text)]
        stats.questions_with_right += bool(right)
        by_verdict = {v: [s for s, w in zip(found, verdicts, strict=True) if w == v and s.text]
                      for v in ("wrong", "neither")}
        kind = "wrong" if by_verdict["wrong"] else {"wrong-or-neither": "neither",
                                                     "wrong-or-swapped": "swapped"}.get(rejected)
        if not right or kind is None or (kind == "neither" and not by_verdict[kind]):
            continue
        good = rng.choice(right)
        bad = swap_key(good.text, item.options, mcq.LETTERS.index(item.answer), rng) if kind == "swapped" else \
            rng.choice(by_verdict[kind]).text
        if bad is None:
            stats.unswappable += 1
            continue
        pairs.append(PreferencePair(
            prompt=[Message(**m) for m in conversation(item.question, system_prompt)],
            chosen=[Message(role="assistant", content=good.text)],
            rejected=[Message(role="assistant", content=bad)], source=SOURCE,
            meta={"question_id": item.id, "format": "chat", "rejected": kind}))
        stats.pairs[kind] += 1
    rng.shuffle(pairs)  # sources mixed, so a recipe's `limit` takes a sample of all of them
    return pairs, stats
