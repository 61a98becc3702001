"""A stand-in for vLLM behind service.engine.Engine, for fast tests of the HTTP layer only. It speaks the
real tokenizer and honours the parameters the routes rely on (n, max_tokens, stop, allowed ids, logprobs)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

from service.engine import ChoiceDelta, EngineOutput, EngineRejected, EngineUnavailable, GenParams, TokenLogprob
from zephyr.settings import Settings


class StubEngine:
    def __init__(self, tokenizer, model_name: str, max_model_len: int = 2048):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.reply = "Photosynthesis turns light into chemical energy. Contact me at tutor@example.com."
        self.replies: dict[int, str] = {}  # per choice index, a reply other than `reply`
        self.candidate_reply: str | None = None  # a review candidate's ("cand-..." requests), where not `reply`
        self.steps_generated = 0  # engine steps the last generation ran (fewer when it was aborted)
        self.letter_scores: dict[str, float] = {"B": 2.0}  # the "model" prefers B
        # Prompt log-probabilities (cloze): -4 per token, plus these bonuses for tokens that decode to a key.
        self.token_bonus: dict[str, float] = {"Carbon": 6.0}
        self.cache_hit = 0  # tokens a request reading the prefix cache reports as cached
        self.delay = 0.0  # seconds per token
        self.score_delay = 0.0  # seconds each scoring request (the MCQ letter, an option's cloze score) takes
        self.fail_with: Exception | None = None
        self.fail_midway: Exception | None = None  # raised after the answer's first step went out
        self.letters_without_logprob: set[str] = set()  # letters the engine leaves out of the requested logprobs
        self.last_finish: str | None = None  # a finish reason the last step gives instead ("error", "abort")
        self.calls: list[tuple[list[int], GenParams]] = []
        self._errored = False
        self.shut_down = False
        self.hung = False  # a hung engine: requests wait with no output until kill()
        self.killed = asyncio.Event()

    @classmethod
    def factory(cls, tokenizer):
        def make(settings: Settings, path: Path, name: str) -> StubEngine:
            engine = cls(tokenizer, name, settings.max_model_len)
            make.last = engine
            return engine

        return make

    @property
    def errored(self) -> bool:
        return self._errored

    def die(self) -> None:
        self._errored = True

    def kill(self) -> None:
        self._errored = True
        self.killed.set()

    async def check_health(self) -> None:
        if self._errored:
            raise EngineUnavailable("dead")

    def shutdown(self) -> None:
        self.shut_down = True

    async def generate(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[EngineOutput]:
        self.calls.append((prompt_ids, params))
        if self.fail_with is not None:
            raise self.fail_with
        if self.hung:
            await self.killed.wait()
        if self._errored:
            raise EngineUnavailable("the inference engine stopped; retry on another replica")
        if params.n > 1 and params.temperature == 0:  # vLLM's SamplingParams refuses it (it raises 1e-6 to 0.01)
            raise EngineRejected("n must be 1 when using greedy sampling, got 2.")
        if self.score_delay and (params.allowed_token_ids or params.prompt_logprobs or params.logprob_token_ids):
            await asyncio.sleep(self.score_delay)
        if params.allowed_token_ids:
            yield self._constrained(params)
            return
        scored = self._scored(prompt_ids, params) if params.prompt_logprobs else None
        if scored is not None and params.max_tokens <= 1:  # lm-eval's scoring: the prompt and one token
            yield scored
            return
        if params.logprob_token_ids:  # cloze's first option token after a context read from the cache
            yield self._next_token(params.logprob_token_ids)
            return
        answers = []
        for index in range(params.n):
            default = self.candidate_reply if self.candidate_reply and request_id.startswith("cand-") else self.reply
            text = self.replies.get(index, default)
            for stop in params.stop:
                text = text.split(stop)[0]
            answers.append(self.tokenizer.encode(text, add_special_tokens=False)[: params.max_tokens])
        self.steps_generated = 0
        steps = max(len(ids) for ids in answers)
        for step in range(steps):
            if self.delay:
                await asyncio.sleep(self.delay)
            if step == 1 and self.fail_midway is not None:
                raise self.fail_midway
            self.steps_generated += 1
            choices = []
            for index, ids in enumerate(answers):
                if step >= len(ids):
                    continue  # this choice has finished
                token_id, last = ids[step], step == len(ids) - 1
                finish = self.last_finish or ("length" if len(ids) == params.max_tokens else "stop")
                logprobs = None
                if params.logprobs is not None:
                    top = [(token_id, self.tokenizer.decode([token_id]), -0.1)]
                    top += [(t, self.tokenizer.decode([t]), -3.0 - t / 1e6) for t in (11, 12, 13, 14)]
                    logprobs = [TokenLogprob(token_id, top[0][1], -0.1, top[: max(params.logprobs, 1)])]
                choices.append(ChoiceDelta(index, self.tokenizer.decode([token_id]), [token_id], logprobs,
                                           finish if last else None))
            output = EngineOutput(choices, finished=step == steps - 1)
            if scored is not None and step == 0:  # a scored prompt answered at length: its scores ride on the first
                output.prompt_logprobs, output.prompt_top = scored.prompt_logprobs, scored.prompt_top
                output.num_cached_tokens = scored.num_cached_tokens
            yield output

    def _token_logprob(self, token_id: int) -> float:
        return -4.0 + self.token_bonus.get(self.tokenizer.decode([token_id]).strip(), 0.0)

    def _next_token(self, token_ids: list[int]) -> EngineOutput:
        requested = {tid: self._token_logprob(tid) for tid in token_ids}
        best = max(requested, key=requested.__getitem__)
        entry = TokenLogprob(best, self.tokenizer.decode([best]), requested[best], [], requested)
        return EngineOutput([ChoiceDelta(0, entry.token, [best], [entry], "length")], finished=True)

    def _scored(self, prompt_ids: list[int], params: GenParams) -> EngineOutput:
        cached = 0 if params.skip_reading_prefix_cache else min(self.cache_hit, len(prompt_ids) - 1)
        values: list[float | None] = [None]
        top: list[list[tuple[int, float]]] = [[]]
        for position, token_id in enumerate(prompt_ids[1:], start=1):
            # As vLLM: no log-probability for a token whose preceding position was read from the cache.
            values.append(None if position <= cached else self._token_logprob(token_id))
            # The prompt's own token is the likeliest; then less likely ones (GenParams.prompt_top_logprobs).
            alternatives = [(t, -7.0 - t / 1e6) for t in (11, 12, 13, 14, 15) if t != token_id]
            top.append([] if values[-1] is None else [(token_id, values[-1]), *alternatives])
        token_id = prompt_ids[-1]
        text = self.tokenizer.decode([token_id])
        logprobs = None if params.logprobs is None else [TokenLogprob(token_id, text, -0.5, [(token_id, text, -0.5)])]
        return EngineOutput([ChoiceDelta(i, text, [token_id], logprobs, "length") for i in range(params.n)],
                            finished=True, prompt_logprobs=values, num_cached_tokens=cached,
                            prompt_top=[t[: params.prompt_top_logprobs] for t in top] if params.prompt_top_logprobs
                            else None)

    def _constrained(self, params: GenParams) -> EngineOutput:
        letters = {tid: self.tokenizer.decode([tid]).strip() for tid in params.allowed_token_ids}
        logits = {tid: self.letter_scores.get(letter, 0.0) for tid, letter in letters.items()}
        log_total = math.log(sum(math.exp(v) for v in logits.values()) + 10.0)  # mass off the letters too
        requested = {tid: logits[tid] - log_total for tid in params.logprob_token_ids or ()
                     if letters.get(tid) not in self.letters_without_logprob}
        best = max(logits, key=logits.__getitem__)
        entry = TokenLogprob(best, letters[best], logits[best] - log_total, [], requested)
        return EngineOutput([ChoiceDelta(0, letters[best], [best], [entry], "length")], finished=True)
