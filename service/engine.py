"""The engine seam: our routes speak to `Engine`; `VLLMEngine` is vLLM's AsyncLLM in this process (its
EngineCore runs in a child process). Unit tests put a stub behind the same interface."""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from zephyr import memory
from zephyr.registry import vllm_serving_problem
from zephyr.settings import Settings

log = logging.getLogger("zephyr.engine")


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-k alternatives per token; 0 = the sampled token only
    allowed_token_ids: list[int] | None = None
    logprob_token_ids: list[int] | None = None  # exact log-probabilities of these tokens
    prompt_logprobs: bool = False  # the log-probability of each prompt token (cloze scoring)
    prompt_top_logprobs: int = 0  # with prompt_logprobs: also this many most likely tokens at each position (echo)
    # None: vLLM's rule (no cache reads with prompt log-probabilities). False lets a cloze request reuse the
    # question's KV blocks; the caller then trusts only positions past EngineOutput.num_cached_tokens.
    skip_reading_prefix_cache: bool | None = None
    # vLLM's extra sampling parameters (chat requests may set them, as with `vllm serve`).
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: list[str] = field(default_factory=list)  # phrases the answer may not write (vLLM bans their last token)


SAMPLING_FIELDS = ("n", "max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                   "logprobs", "allowed_token_ids", "logprob_token_ids", "skip_reading_prefix_cache", "top_k", "min_p",
                   "repetition_penalty", "ignore_eos", "min_tokens", "include_stop_str_in_output",
                   "skip_special_tokens", "spaces_between_special_tokens")


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, logprob), most likely first
    requested: dict[int, float] = field(default_factory=dict)  # for GenParams.logprob_token_ids


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class EngineOutput:
    choices: list[ChoiceDelta]
    finished: bool
    # With GenParams.prompt_logprobs, on the first output: entry p is the log-probability of prompt token p
    # (entry 0 is None). Positions below num_cached_tokens came from the prefix cache and hold no value.
    prompt_logprobs: list[float | None] | None = None
    num_cached_tokens: int = 0
    # With GenParams.prompt_top_logprobs: entry p holds the most likely tokens at prompt position p as
    # (token id, logprob), most likely first (entry 0 and positions from the prefix cache are empty).
    prompt_top: list[list[tuple[int, float]]] | None = None


class EngineUnavailable(RuntimeError):
    """The engine died or is shutting down; the service answers 503."""


class EngineRejected(ValueError):
    """The engine refused the request's parameters; the service answers 400 with this message."""


class Engine(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Any

    def generate(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[EngineOutput]: ...

    async def check_health(self) -> None: ...

    @property
    def errored(self) -> bool: ...

    def kill(self) -> None:
        """Stop a hung engine at once, so that it errors: every request waiting on it fails, as at its death."""
        ...

    def shutdown(self) -> None: ...


class WatchedEngine:
    """An engine whose progress is watched. A hung engine (a deadlocked or stopped process) neither errors nor
    answers: its requests wait forever and the server stays ready. `stalled_seconds` says how long requests have
    waited with no output reaching any request; the app's watchdog kills the engine past a limit. Only waits
    count, not the time a consumer takes between outputs (a stream to a slow client is no stall); an idle engine is
    asked for one token now and then (the app's watchdog), so a hang is found before a student meets it."""

    def __init__(self, engine: Engine, clock: Any = time.monotonic):
        self.engine = engine
        self._clock = clock
        self._waiting: set[int] = set()  # generate calls waiting on their next output
        self._busy_since = 0.0  # since when something has waited without a break
        self._last_output = clock()

    def __getattr__(self, name: str) -> Any:  # everything but generate is the engine's own
        return getattr(self.engine, name)

    @property
    def errored(self) -> bool:  # a property is looked up on the class, so it is forwarded by hand
        return self.engine.errored

    def stalled_seconds(self) -> float:
        """Seconds since requests began waiting without a break, or any request last got an output, whichever is
        later; 0 while nothing waits. Clients that give up and others that come meanwhile do not restart it."""
        if not self._waiting:
            return 0.0
        return self._clock() - max(self._busy_since, self._last_output)

    def idle_seconds(self) -> float:
        """Seconds since the engine last answered anything, while nothing waits on it (0 while something does)."""
        return 0.0 if self._waiting else self._clock() - self._last_output

    async def generate(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[EngineOutput]:
        outputs = self.engine.generate(prompt_ids, params, request_id)
        key = id(outputs)
        try:
            while True:
                if not self._waiting:
                    self._busy_since = self._clock()
                self._waiting.add(key)
                try:
                    output = await anext(outputs)
                except StopAsyncIteration:
                    self._last_output = self._clock()  # an end or an error is an answer too
                    return
                except Exception:
                    self._last_output = self._clock()
                    raise
                finally:  # a cancelled wait (a client that gave up) is no answer: it leaves _last_output
                    self._waiting.discard(key)
                self._last_output = self._clock()
                yield output
        finally:
            await outputs.aclose()


class VLLMEngine:
    """vLLM's AsyncLLM with our parameter and output types. Create with `VLLMEngine.start(...)`."""

    def __init__(self, llm: Any, model_name: str, max_model_len: int, tokenizer: Any):
        self._llm = llm
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer

    @classmethod
    def engine_args(cls, settings: Settings, model_path: Path, model_name: str) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(
            model=str(model_path),
            served_model_name=[model_name],
            **settings.vllm_engine_kwargs(model_path),
            disable_log_stats=False,
        )

    @staticmethod
    def refusal(settings: Settings, model_path: Path, model_name: str) -> str | None:
        """Why vLLM could not serve this model here (a CUDA-only checkpoint, not enough memory), or None."""
        return (vllm_serving_problem(model_path, model_name) or memory.block_size_problem(settings.block_size)
                or memory.plan(model_path, settings).problem)

    @classmethod
    def start(cls, settings: Settings, model_path: Path, model_name: str) -> VLLMEngine:
        if problem := cls.refusal(settings, model_path, model_name):
            raise RuntimeError(problem)
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.update(settings.vllm_environment())

        # The API-server usage context gives the batch defaults `vllm serve` gets on this platform.
        llm = AsyncLLM.from_engine_args(cls.engine_args(settings, model_path, model_name),
                                        usage_context=UsageContext.OPENAI_API_SERVER)
        return cls(llm, model_name, llm.model_config.max_model_len, llm.get_tokenizer())

    @property
    def errored(self) -> bool:
        return bool(self._llm.errored)

    def exit_codes(self) -> list[int]:
        """Exit codes of the engine's processes that have ended (-9: SIGKILL, what the kernel's OOM killer sends)."""
        return [p.exitcode for p in self._engine_processes() if p.exitcode is not None]

    async def check_health(self) -> None:
        await self._llm.check_health()

    def kill(self) -> None:
        # SIGKILL reaches a stopped or deadlocked process; vLLM's monitor then finds it dead and fails every request.
        for process in self._engine_processes():
            if process.is_alive():
                process.kill()

    def _engine_processes(self) -> list[Any]:
        manager = getattr(getattr(getattr(self._llm, "engine_core", None), "resources", None), "engine_manager", None)
        return list(getattr(manager, "processes", []))

    def shutdown(self) -> None:
        self._llm.shutdown()

    def sampling_params(self, params: GenParams) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        # Fields SamplingParams takes under the same name and meaning; the rest need translating.
        same = {name: getattr(params, name) for name in SAMPLING_FIELDS}
        return SamplingParams(
            **same,
            stop=params.stop or None,
            stop_token_ids=params.stop_token_ids or None,
            bad_words=params.bad_words or None,
            prompt_logprobs=params.prompt_top_logprobs if params.prompt_logprobs else None,
            # Prompt positions read from the prefix cache carry uninitialized token ids, which vLLM's detokenizer
            # cannot decode (OverflowError in the output handler kills the engine): score by ids, never by text.
            detokenize=not params.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(
        self, prompt_ids: list[int], params: GenParams, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        def translated(exc: Exception) -> Exception:
            """What vLLM raised, as the tutor answers it: the request's fault a 400, the engine's a 503. Once the
            engine has errored, every request in flight gets its output handler's error wrapped (an OverflowError
            in its detokenizer reads like a request's bad value): a 503, not the client's 400."""
            if isinstance(exc, EngineDeadError) or self.errored:
                return EngineUnavailable("the inference engine stopped; retry on another replica")
            if isinstance(exc, VLLMClientError | ValueError | OverflowError | TypeError):
                return EngineRejected(str(exc))
            if isinstance(exc, EngineGenerateError):  # vLLM aborted the request and wrapped what went wrong
                cause = exc.__cause__
                if isinstance(cause, ValueError | OverflowError | TypeError):
                    return EngineRejected(str(cause))
                return EngineUnavailable(f"the engine failed this request ({type(cause).__name__}); retry")
            return exc

        # vLLM keys requests by id: a suffix keeps a retried id from colliding with a running one.
        engine_request_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        # Only vLLM's own calls are translated: a fault in our conversion of its outputs below is a fault of ours
        # (a 500 with its traceback logged), not "the engine refused the request".
        try:
            sampling = self.sampling_params(params)
            # Already tokenized (chat template applied by us), so hand vLLM a ready engine input.
            outputs = self._llm.generate(tokens_input(prompt_ids), sampling, engine_request_id)
        except Exception as exc:
            if (mapped := translated(exc)) is exc:
                raise
            raise mapped from exc
        # vLLM leaves the answer's text empty when it does not detokenize: decoded here from its ids instead.
        decoded = None if sampling.detokenize else TextFromIds(self.tokenizer, params)
        async with aclosing(outputs):  # a request closed early aborts vLLM's at once, not at garbage collection
            while True:
                try:
                    out = await anext(outputs)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    if (mapped := translated(exc)) is exc:
                        raise
                    raise mapped from exc
                yield EngineOutput(
                    choices=[self._choice(c, params.logprob_token_ids, decoded) for c in out.outputs],
                    finished=out.finished,
                    prompt_logprobs=_prompt_logprobs(prompt_ids, out.prompt_logprobs),
                    num_cached_tokens=out.num_cached_tokens or 0,
                    prompt_top=_prompt_top(out.prompt_logprobs) if params.prompt_top_logprobs else None,
                )

    def _choice(self, c: Any, requested_ids: list[int] | None, decoded: TextFromIds | None) -> ChoiceDelta:
        logprobs = None
        if c.logprobs is not None:
            logprobs = []
            for token_id, candidates in zip(c.token_ids, c.logprobs, strict=False):
                chosen = candidates.get(token_id)
                ranked = sorted(
                    (item for item in candidates.items() if item[1].rank is not None),
                    key=lambda item: item[1].rank,
                )
                logprobs.append(
                    TokenLogprob(
                        token_id=token_id,
                        token=_token_text(chosen, token_id, self.tokenizer),
                        logprob=_finite(chosen.logprob if chosen else -math.inf),
                        top=[(tid, _token_text(lp, tid, self.tokenizer), _finite(lp.logprob)) for tid, lp in ranked],
                        requested={tid: candidates[tid].logprob for tid in requested_ids or () if tid in candidates},
                    )
                )
        text = c.text if decoded is None else decoded.delta(c.index, c.token_ids, c.finish_reason)
        return ChoiceDelta(
            index=c.index, text=text, token_ids=list(c.token_ids), logprobs=logprobs, finish_reason=c.finish_reason
        )


class TextFromIds:
    """Each choice's new text from its generated token ids, for a request vLLM does not detokenize, as vLLM's
    detokenizer would give it: incrementally (the tokenizers library's DecodeStream, which holds back a character
    still being spelled out in bytes), special tokens skipped as the request says, and the token that stopped the
    answer left out unless `include_stop_str_in_output`."""

    def __init__(self, tokenizer: Any, params: GenParams):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer  # vLLM serves fast (tokenizers-backed) tokenizers
        self.keep_stop = params.include_stop_str_in_output
        self.streams = defaultdict(lambda: DecodeStream(skip_special_tokens=params.skip_special_tokens))

    def delta(self, index: int, token_ids: Any, finish_reason: str | None) -> str:
        ids = list(token_ids)
        if finish_reason == "stop" and not self.keep_stop:
            ids = ids[:-1]  # an EOS or a stop token id: scoring requests take no stop strings (completions.py)
        stream = self.streams[index]
        return "".join(chunk for token_id in ids if (chunk := stream.step(self.backend, token_id)) is not None)


def _prompt_logprobs(prompt_ids: list[int], entries: list[dict[int, Any] | None] | None) -> list[float | None] | None:
    if not entries:
        return None
    values: list[float | None] = []
    for token_id, entry in zip(prompt_ids, entries, strict=False):
        chosen = entry.get(token_id) if entry else None
        values.append(None if chosen is None else chosen.logprob)
    return values


def _prompt_top(entries: list[dict[int, Any] | None] | None) -> list[list[tuple[int, float]]] | None:
    if not entries:
        return None
    return [sorted(((tid, _finite(lp.logprob)) for tid, lp in (entry or {}).items() if lp.rank is not None),
                   key=lambda item: -item[1]) for entry in entries]


def _token_text(logprob: Any, token_id: int, tokenizer: Any) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number, and -9999.0 is what OpenAI itself sends.
    return value if math.isfinite(value) else -9999.0
