"""The safety guard reads the model's answers too, not only the student's request: a request the guard let through
can still draw out instructions it would have refused. Each choice's text is held back until the sentence it ends
has been judged (zephyr.safety.AnswerSegments), so nothing the guard flags reaches the student: a stream shows an
answer a sentence at a time. A flagged sentence ends that choice: what the student already saw stays, the guard's
reply follows it, and the choice finishes with `content_filter`. The log row keeps what was shown and, in
`params.answer_safety`, the verdict and the sentence withheld, for reviewers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from service.engine import ChoiceDelta, EngineOutput
from service.generation import GenerationRequest
from zephyr.safety import FINISH_REASON, REPLIES, AnswerSegments, Verdict

Judge = Callable[[list[str]], Awaitable[list[Verdict]]]


@dataclass
class _Choice:
    """One choice's text as it streams: what the guard has cut into sentences, the deltas not yet shown, and how
    many characters of the answer they start at."""

    segments: AnswerSegments = field(default_factory=AnswerSegments)
    held: list[ChoiceDelta] = field(default_factory=list)
    shown_chars: int = 0
    withheld: bool = False
    finished: bool = False
    unshown_tokens: int = 0  # generated after the choice was withheld

    def release(self, upto: int | None = None) -> ChoiceDelta | None:
        """The held deltas that lie wholly inside judged sentences (or the first `upto` characters of the answer),
        joined into one; None when there are none. A delta with no text goes with the next one that has text: its
        token's text is held back by the detokenizer (half a character, a possible stop string) and comes in that
        one, so its log-probabilities name a token of text not yet judged."""
        ready, end, count = self.segments.ready if upto is None else upto, self.shown_chars, 0
        for i, delta in enumerate(self.held):
            if end + len(delta.text) > ready:
                break
            end += len(delta.text)
            if delta.text or delta.finish_reason is not None:
                count = i + 1
        if self.finished and upto is None and end == len(self.segments.text):
            count = len(self.held)  # the answer has ended and all of it was judged clean
        if count == 0:
            return None
        out, self.held = self.held[:count], self.held[count:]
        self.shown_chars = end
        logprobs = [entry for d in out for entry in (d.logprobs or [])]
        return ChoiceDelta(index=out[0].index, text="".join(d.text for d in out),
                           token_ids=[t for d in out for t in d.token_ids],
                           logprobs=logprobs if any(d.logprobs is not None for d in out) else None,
                           finish_reason=out[-1].finish_reason)


async def screened(gen: GenerationRequest, outputs: AsyncIterator[EngineOutput],
                   judge: Judge) -> AsyncIterator[EngineOutput]:
    """`outputs` with each choice's text shown only once the sentences it completes were judged clean; one output
    for each of the engine's (the prompt's log-probabilities ride on the first, as before), so the time to the first
    token and between tokens are the engine's. Ends the engine request once every choice has finished or was
    withheld (a withheld choice is not left to run to its token limit)."""
    choices = {i: _Choice() for i in range(gen.params.n)}
    try:
        async with aclosing(_screened(gen, choices, outputs, judge)) as inner:  # closed now: it aborts the engine's
            async for shown in inner:
                yield shown
    finally:
        # Tokens generated and never shown (held when the client left, or written after a withheld sentence while
        # the other choices went on) were generated all the same: the usage and the token metrics count them.
        for index, choice in choices.items():
            if unshown := sum(len(d.token_ids) for d in choice.held) + choice.unshown_tokens:
                gen.token_counts[index] = gen.token_counts.get(index, 0) + unshown
            choice.held, choice.unshown_tokens = [], 0


async def _screened(gen: GenerationRequest, choices: dict[int, _Choice], outputs: AsyncIterator[EngineOutput],
                    judge: Judge) -> AsyncIterator[EngineOutput]:
    async with aclosing(outputs) as source:
        async for out in source:
            shown: list[ChoiceDelta] = []
            for delta in out.choices:
                choice = choices[delta.index]
                if choice.withheld:  # what the model writes after a withheld sentence is not shown either
                    choice.unshown_tokens += len(delta.token_ids)
                    continue
                choice.held.append(delta)
                choice.finished = delta.finish_reason is not None
                judged_before = choice.segments.ready
                sentences = choice.segments.feed(delta.text, final=delta.finish_reason is not None)
                verdicts = await judge(sentences) if sentences else []
                # The first flagged sentence in the answer's order is where it stops: it decides the reply and is
                # the one logged; the clean sentences before it are shown (one output can complete several when
                # the engine coalesces tokens).
                if (first := next((i for i, v in enumerate(verdicts) if v.flagged), None)) is not None:
                    clean_until = choice.segments.ends[first - 1] if first else judged_before
                    shown.append(_withhold(gen, choice, delta.index, verdicts[first], sentences[first], clean_until))
                elif (released := choice.release()) is not None:
                    shown.append(released)
            done = any(c.withheld for c in choices.values()) and all(c.withheld or c.finished
                                                                     for c in choices.values())
            yield EngineOutput(choices=shown, finished=out.finished or done, prompt_logprobs=out.prompt_logprobs,
                               num_cached_tokens=out.num_cached_tokens, prompt_top=out.prompt_top)
            if done:
                return  # leaving the loop closes the engine's stream, which aborts the request


def _withhold(gen: GenerationRequest, choice: _Choice, index: int, verdict: Verdict, sentence: str,
              clean_until: int) -> ChoiceDelta:
    """The choice's last delta: the clean sentences before the flagged one not yet shown (up to `clean_until`
    characters of the answer; log-probabilities for the tokens wholly inside them), then the guard's reply (every
    held token counts as generated); the verdict with the sentence that decided it goes in the log row. One delta,
    so a client that reads a chunk's first choice reads all of it."""
    clean = choice.release(upto=clean_until)  # whole deltas, with their tokens' log-probabilities
    # The judged-clean text of the delta that also starts the flagged sentence (it may hold whole clean sentences).
    rest = choice.segments.text[choice.shown_chars:clean_until].rstrip()
    choice.shown_chars += len(rest)
    choice.withheld = True
    gen.extra_params.setdefault("answer_safety", {})[str(index)] = verdict.logged | {"sentence": sentence}
    before = gen.answer_prefix or choice.shown_chars
    token_ids = [*(clean.token_ids if clean else []), *(t for d in choice.held for t in d.token_ids)]
    choice.held = []
    return ChoiceDelta(index=index, text=(clean.text if clean else "") + rest + ("\n\n" if before else "")
                       + REPLIES[verdict.category], token_ids=token_ids, logprobs=clean.logprobs if clean else None,
                       finish_reason=FINISH_REASON)
