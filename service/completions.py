"""OpenAI's legacy completions (`POST /v1/completions`) on the tutor's engine: a raw prompt (text or token ids)
continued without the chat template, optionally echoed with its tokens' log-probabilities, which is how
lm-eval's `local-completions` model scores log-likelihood tasks. The tutor's checks, engine run, metrics and
generation log serve this route as they serve chats."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from service.auth import Principal
from service.engine import GenParams, TokenLogprob
from service.errors import APIError
from service.generation import GenerationRequest, event_stream, new_id, one_choice_each, sse
from service.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from service.tutor import Tutor
from zephyr.safety import FINISH_REASON

ROUTE = "completions"


@dataclass
class Completion:
    """One completion request as the route runs it: the engine request and what shapes the answer."""

    gen: GenerationRequest
    prompt_text: str
    echo: bool
    logprobs: int | None  # the request's `logprobs`: None for none, else the alternatives per position

    @property
    def shown(self) -> bool:
        """False for `max_tokens: 0`: the engine's one token is generated but not answered."""
        return self.gen.answer_shown

    @property
    def unshown_finish(self) -> str:
        """A `max_tokens: 0` choice's reason: "length", or the filter's where the guard flagged the prompt (its
        scores then lack the alternatives)."""
        return FINISH_REASON if self.gen.withheld else "length"

    def usage(self) -> Usage:
        usage = self.gen.usage()
        if not self.shown:
            usage.total_tokens, usage.completion_tokens = usage.prompt_tokens, 0
        return usage


async def prepare_completion(tutor: Tutor, req: CompletionRequest, principal: Principal) -> Completion:
    tutor.check_generation(req)
    tokenizer = tutor.engine.tokenizer
    if isinstance(req.prompt, str):
        tutor.check_prompt_chars(len(req.prompt), "prompt")
        prompt_text = req.prompt
        prompt_ids = await asyncio.to_thread(tokenizer.encode, prompt_text)  # as vLLM's server tokenizes a prompt
    else:
        prompt_ids = list(req.prompt)
        vocabulary = len(tokenizer)  # once: len() of a tokenizer is no constant, and this runs on the event loop
        if prompt_ids and max(prompt_ids) >= vocabulary:
            unknown = [i for i in prompt_ids if i >= vocabulary]
            raise APIError(400, f"`prompt` holds token ids outside the vocabulary of {vocabulary}: "
                                f"{unknown[:5]}", param="prompt")
        tutor.check_prompt_length(prompt_ids, "prompt")  # before decoding: a long list costs time to decode
        prompt_text = await asyncio.to_thread(tokenizer.decode, prompt_ids)
    if not prompt_ids:
        raise APIError(400, "`prompt` holds no tokens; send text to continue", param="prompt")
    tutor.check_prompt_length(prompt_ids, "prompt")
    asked = req.answer_limit
    tutor.answer_room(prompt_ids, asked, "max_tokens", defaulted=req.answer_limit_defaulted)
    scored = req.echo and req.logprobs is not None
    if scored and req.stop:
        # Scoring the prompt turns vLLM's detokenizer off (service/engine.py), and stop strings need it.
        raise APIError(400, "`stop` strings cannot be combined with `echo` and `logprobs` (the prompt is scored by "
                            "token ids); use `stop_token_ids`, or leave out `echo` or `logprobs`", param="stop")
    params = GenParams(
        max_tokens=max(asked, 1),  # `max_tokens: 0` still runs the prompt through the model, for one token
        logprobs=req.logprobs,
        prompt_logprobs=scored,
        prompt_top_logprobs=req.logprobs if scored else 0,
        stop_token_ids=tutor.stop_token_ids(req.stop_token_ids or []),
        **req.sampling(),
    )
    gen = GenerationRequest(
        request_id=new_id("cmpl"), route=ROUTE, messages=[{"role": "prompt", "content": prompt_text}],
        prompt_ids=prompt_ids, params=params, principal=principal, user=req.user,
        extra_params={"stream": req.stream, "echo": req.echo, "max_tokens_asked": asked}, answer_shown=asked > 0,
        # lm-eval's scoring (the prompt's log-probabilities and one generated token) is not read: one token is no
        # instruction (the guard read the prompt). A scored prompt that asks for more is an answer like any other.
        screen_answer=asked > 1 or (asked > 0 and not scored),
    )
    # A prompt only scored for its own tokens (`max_tokens: 0`, `logprobs: 0`) gets nothing of the model's. One that
    # generates, or asks for the likeliest tokens at each position (the model's next token, read one position at a
    # time), is screened: a flagged one keeps its own tokens' scores (lm-eval's log-likelihoods) and loses the
    # generated text and the alternatives (Tutor._withheld).
    if asked > 0 or (scored and req.logprobs):
        await tutor.screen(gen, [prompt_text])
    return Completion(gen, prompt_text, req.echo, req.logprobs)


async def complete(tutor: Tutor, job: Completion) -> CompletionResponse:
    await tutor.run_to_end(job.gen)
    # With log-probabilities (the prompt's too, with echo) the response is many objects: built off the event loop.
    return await asyncio.to_thread(_completed, tutor, job) if job.logprobs is not None else _completed(tutor, job)


def _completed(tutor: Tutor, job: Completion) -> CompletionResponse:
    gen = job.gen
    prompt = _prompt_logprobs(tutor, job) if job.echo and job.logprobs is not None else None
    choices = []
    for i in range(gen.params.n):
        text = gen.text(i) if job.shown else ""
        logprobs = None
        if job.logprobs is not None:
            entries = (_reply_entry(gen) if gen.withheld else gen.logprobs.get(i, [])) if job.shown else []
            logprobs = _joined(prompt, _generated(entries, job.logprobs, _answer_offset(job, prompt)))
        choices.append(CompletionChoice(
            index=i, text=(job.prompt_text if job.echo else "") + text, logprobs=logprobs,
            finish_reason=gen.finish_reasons.get(i) if job.shown else job.unshown_finish))
    return CompletionResponse(id=gen.request_id, created=gen.created, model=tutor.model_name, choices=choices,
                              usage=job.usage())


def stream(tutor: Tutor, job: Completion, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events, each a CompletionResponse with the choices' new text; the echoed prompt (with its
    log-probabilities) comes first, the usage last when asked for, then `data: [DONE]`."""
    gen = job.gen

    def event(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(CompletionResponse(id=gen.request_id, created=gen.created, model=tutor.model_name,
                                      choices=choices, usage=usage))

    async def chunks() -> AsyncIterator[str]:
        offsets = dict.fromkeys(range(gen.params.n), len(job.prompt_text))
        echoed = not job.echo
        async with aclosing(tutor.run(gen)) as outputs:
            async for out in outputs:
                if not echoed:  # after the first output, which carries the prompt's log-probabilities
                    echoed = True
                    prompt = None if job.logprobs is None else await asyncio.to_thread(_prompt_logprobs, tutor, job)
                    offsets = dict.fromkeys(offsets, _answer_offset(job, prompt))
                    yield one_choice_each(event, [CompletionChoice(index=i, text=job.prompt_text, logprobs=prompt,
                                                                   finish_reason=None) for i in range(gen.params.n)])
                choices = []
                for c in out.choices:
                    text, entries = (c.text, c.logprobs or []) if job.shown else ("", [])
                    if job.shown and gen.withheld and text:
                        entries = _reply_entry(gen)
                    finish = (c.finish_reason if job.shown else job.unshown_finish) if c.finish_reason else None
                    if not text and not finish and not (job.logprobs is not None and entries):
                        continue  # (a token still spelling out a character has no text yet, but its log-probability)
                    logprobs = None
                    if job.logprobs is not None:
                        logprobs = _generated(entries, job.logprobs, offsets[c.index])
                        offsets[c.index] += sum(len(token) for token in logprobs.tokens)
                    choices.append(CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=finish))
                if choices:
                    if any(c.text for c in choices):
                        tutor.first_text_sent(gen)
                    yield one_choice_each(event, choices)

    return event_stream(chunks(), (lambda: event([], job.usage())) if include_usage else None,
                        tutor.metrics.stream_failed(gen.route))


def _finite(value: float | None) -> float | None:
    # JSON has no -inf; OpenAI sends -9999.0 for a token too unlikely to have a log-probability.
    return value if value is None or math.isfinite(value) else -9999.0


def _reply_entry(gen: GenerationRequest) -> list[TokenLogprob]:
    """The guard's reply where the model's tokens were withheld, as one entry: the lists keep the length a client
    expects (the prompt's tokens, then what was generated). lm-eval reads a continuation's scores as
    `token_logprobs[ctxlen:-1]`: without it, the continuation lost its last token's score. Not the model's text, so
    the least likely a log-probability says."""
    return [TokenLogprob(token_id=-1, token=gen.withheld or "", logprob=-9999.0, top=[])]


def _prompt_logprobs(tutor: Tutor, job: Completion) -> CompletionLogprobs:
    """The echoed prompt's tokens: each one's log-probability after those before it (the first has none) and
    the `logprobs` most likely tokens there, the prompt's own included."""
    gen, tokenizer = job.gen, tutor.engine.tokenizer
    ids = gen.prompt_ids
    tokens = [tokenizer.decode([token_id]) for token_id in ids]
    values = [_finite(v) for v in (gen.prompt_logprobs or [None] * len(ids))]
    values[0] = None
    top: list[dict[str, float] | None] = [None]
    for position in range(1, len(ids)):
        ranked = gen.prompt_top[position] if gen.prompt_top else []
        alternatives = {tokenizer.decode([tid]): logprob for tid, logprob in ranked[: job.logprobs]}
        top.append(alternatives | ({tokens[position]: values[position]} if values[position] is not None else {}))
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=top,
                              text_offset=_offsets(tokens, 0))


def _generated(entries: list[TokenLogprob], top: int, start: int) -> CompletionLogprobs:
    tokens = [e.token for e in entries]
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{text: logprob for _, text, logprob in e.top[:top]} | {e.token: e.logprob} for e in entries],
        text_offset=_offsets(tokens, start))


def _joined(prompt: CompletionLogprobs | None, generated: CompletionLogprobs) -> CompletionLogprobs:
    if prompt is None:
        return generated
    return CompletionLogprobs(tokens=prompt.tokens + generated.tokens,
                              token_logprobs=prompt.token_logprobs + generated.token_logprobs,
                              top_logprobs=prompt.top_logprobs + generated.top_logprobs,
                              text_offset=prompt.text_offset + generated.text_offset)


def _answer_offset(job: Completion, prompt: CompletionLogprobs | None) -> int:
    """Where the answer's first token starts: right after the echoed prompt's tokens when they are listed (their
    pieces may decode longer than the prompt's text, e.g. a character spread over byte tokens), so the offsets keep
    rising; else after the prompt's text."""
    if prompt is not None and prompt.tokens:
        return prompt.text_offset[-1] + len(prompt.tokens[-1])
    return len(job.prompt_text)


def _offsets(tokens: list[str], start: int) -> list[int]:
    """Where each token starts in the prompt followed by the completion (OpenAI's `text_offset`), counted as
    vLLM counts it: the lengths of the tokens before it."""
    offsets, position = [], start
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return offsets
