"""`zephyr eval run`: measure one registry model on the chosen suites and store the results
(ResultStore under ZEPHYR_EVAL_RESULTS_DIR, a summary in the model's registry manifest)."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from evals.results import (
    RUNS_DIR,
    SUITE_BENCHMARKS,
    EvalRun,
    Measurement,
    ResultStore,
    data_read,
    measurement,
    method_metric,
)
from offline import benchmarks
from zephyr import mcq, textquality
from zephyr.console import make_console
from zephyr.prompts import with_system_prompt
from zephyr.registry import Registry, RegistryEntry, cuda_available, is_bitsandbytes
from zephyr.settings import Settings

SUITES = tuple(SUITE_BENCHMARKS)  # in run order: the text suite reuses the gsm8k suite's generations
TEXT_MAX_TOKENS = 128


class EvalError(ValueError):
    """A run that cannot start as asked; the message says what to change."""


@dataclass
class RunOptions:
    model: str
    suite: str
    limit: int | None = None
    benchmarks: list[str] | None = None  # a subset of the suite's MCQ benchmarks
    sources: dict[str, str] = field(default_factory=dict)  # benchmark -> local file/folder or hub name
    server: str | None = None  # also score letter format through this server's /mcq
    api_key: str | None = None
    local: bool = True  # False: only the server measurement (no in-process engine)
    letter: bool = True  # False: skip the letter format (auto is still measured when its method does not read it)
    cloze: bool = True
    explain: bool = False  # letter format as POST /mcq with "explain": true (reasoning first) instead of direct
    gsm8k_max_tokens: int = 256
    reward_model: str | None = None  # registry name or folder of a sequence-classification reward model
    bertscore_model: str | None = None
    bertscore_layers: int | None = None
    dialogrpt: dict[str, str] = field(default_factory=dict)  # measurement metric -> weights folder


def check_options(options: RunOptions, settings: Settings, registry: Registry) -> RegistryEntry:
    """Everything that can be checked before an engine starts."""
    suites = suites_of(options.suite)
    if options.limit is not None and options.limit < 1:
        raise EvalError("--limit must be at least 1")
    entry = registry.get(options.model)
    for name in options.benchmarks or []:
        if name not in benchmarks.MCQ_BENCHMARKS:
            raise EvalError(f"unknown MCQ benchmark {name!r}; known: {', '.join(benchmarks.MCQ_BENCHMARKS)}")
    for name in options.sources:
        if name not in benchmarks.BENCHMARKS:
            raise EvalError(f"--data names unknown benchmark {name!r}; known: {', '.join(benchmarks.BENCHMARKS)}")
    if not options.local and not options.server:
        raise EvalError("--no-local needs --server URL (otherwise nothing would be measured)")
    if options.gsm8k_max_tokens < 1:
        raise EvalError(f"--gsm8k-max-tokens must be at least 1, got {options.gsm8k_max_tokens}")
    if "mcq" in suites and options.local and not options.letter and not options.cloze:
        raise EvalError("--no-letter with --no-cloze leaves the mcq suite nothing to score in process; drop one")
    if not options.letter and options.explain:
        raise EvalError("--explain is a letter format; drop --no-letter to measure it")
    generation = [suite for suite in suites if suite != "mcq"]
    if options.explain and "mcq" not in suites:
        raise EvalError("--explain changes how the mcq suite asks; add the mcq suite (--suite mcq)")
    if options.explain and options.local and needs_transformers(entry):
        raise EvalError(f"--explain generates reasoning with vLLM, which runs {entry.name} (bitsandbytes) only on "
                        "a CUDA GPU; score it without --explain, or through a GPU server with --server --no-local")
    if not options.local and generation:
        raise EvalError("only the mcq suite can be measured through a server (--server with --no-local)")
    if options.local and needs_transformers(entry) and generation:
        where = (f"{entry.name} is a bitsandbytes checkpoint and vLLM runs those only on a CUDA GPU "
                 "(this machine has none)")
        named = f"the {generation[0]} suite needs" if len(generation) == 1 else "the gsm8k and text suites need"
        raise EvalError(f"{named} vLLM: {where}; run `--suite mcq` to score the letter format and cloze through "
                        "transformers")
    return entry


def check_server(url: str, api_key: str | None, entry: RegistryEntry | None = None) -> None:
    """The server answers and takes the key, before an engine starts here: an unreachable or refusing one would
    end the run only after its in-process half. With `entry`, it must serve that model's weights (its card's id and
    revision): the figures are stored under the entry's name, and the gate would read another model's as its."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=15)
    except (httpx.HTTPError, ValueError) as exc:  # InvalidURL is a ValueError
        raise EvalError(f"cannot reach --server {url}: {exc or type(exc).__name__}; give an http(s) address of a "
                        "running `zephyr serve`") from None
    if response.status_code in (401, 403):
        raise EvalError(f"--server {url} refused the key ({response.status_code}); give one with --api-key or "
                        "ZEPHYR_API_KEY")
    if response.status_code != 200:
        raise EvalError(f"--server {url} answered GET /v1/models with {response.status_code}: "
                        f"{response.text[:200]}")
    if entry is None:
        return
    try:
        card = response.json()["data"][0]
        served, revision = card["id"], card.get("revision")
    except (ValueError, KeyError, IndexError, TypeError):
        raise EvalError(f"--server {url} answered GET /v1/models with no model card: {response.text[:200]}") from None
    if served != entry.name:
        raise EvalError(f"--server {url} serves {served!r}, not {entry.name!r}: its answers would be stored as "
                        f"{entry.name}'s; start `zephyr serve` with ZEPHYR_MODEL={entry.name}, or pass --model "
                        f"{served}")
    if revision is not None and revision != entry.manifest.revision:
        raise EvalError(f"--server {url} serves other weights of {entry.name} (revision {revision}; the registry "
                        f"holds {entry.manifest.revision}): restart it on the entry as it is now")


def needs_transformers(entry: RegistryEntry) -> bool:
    """bitsandbytes checkpoints without a CUDA GPU: vLLM cannot load them, transformers can (the mcq suite only)."""
    return is_bitsandbytes(entry) and not cuda_available()


def suites_of(suite: str) -> list[str]:
    """`all`, one suite or a comma-separated list, in SUITES order."""
    names = list(SUITES) if suite.strip() == "all" else [name.strip() for name in suite.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        raise EvalError(f"unknown suite {(', '.join(unknown) or suite)!r}; choose all, or one or more of "
                        f"{', '.join(SUITES)} separated by commas (e.g. gsm8k,text)")
    return [name for name in SUITES if name in names]


def _load(name: str, options: RunOptions, settings: Settings, fingerprints: dict[str, str]) -> list[Any]:
    """The first --limit items of `name`'s reported split; `fingerprints` gains the whole split's, so a limited
    run and a whole one of the same data are known to be the same questions."""
    items = benchmarks.load(name, source=options.sources.get(name), data_dir=settings.data_dir)
    fingerprints[name] = benchmarks.fingerprint(items)
    return benchmarks.first(items, options.limit)


def run(options: RunOptions, settings: Settings, console: Console | None = None) -> list[EvalRun]:
    console = console or make_console(stderr=True)
    registry = Registry(settings.models_dir)
    entry = check_options(options, settings, registry)
    if options.server:
        check_server(options.server, options.api_key, entry)
    # With the registry: a server's answers are compared with this entry's own, not those of weights it replaced.
    store = ResultStore(settings.resolved_eval_results_dir, registry)
    try:  # where the figures go, before the engine's work: a read-only volume would lose an hour's scoring after it
        runs_dir = store.folder(entry.name) / RUNS_DIR
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalError(f"cannot write the results to {exc.filename or runs_dir}: {exc.strerror or exc} (set "
                        "ZEPHYR_EVAL_RESULTS_DIR to a writable folder)") from None
    for folder, what in ((runs_dir, "the results (ZEPHYR_EVAL_RESULTS_DIR)"), (entry.path, "the model's manifest")):
        if not os.access(folder, os.W_OK):
            raise EvalError(f"cannot write {what} in {folder}: it is not writable here")
    # Read every data file before the engine starts, so a missing file fails in a second, not after a minute.
    mcq_names = list(options.benchmarks or benchmarks.MCQ_BENCHMARKS)
    data: dict[str, tuple[str, list[Any]]] = {}
    fingerprints: dict[str, str] = {}  # benchmark (and gsm8k:train) -> its items' digest
    suites = suites_of(options.suite)
    if "mcq" in suites:
        for name in mcq_names:
            split = benchmarks.BENCHMARKS[name].eval_split
            data[name] = (split, _load(name, options, settings, fingerprints))
    if "gsm8k" in suites or "text" in suites:
        data["gsm8k"] = ("test", _load("gsm8k", options, settings, fingerprints))
        data["gsm8k_train"] = ("train", benchmarks.load("gsm8k", split="train", data_dir=settings.data_dir))
        fingerprints["gsm8k:train"] = benchmarks.fingerprint(data["gsm8k_train"][1])
    if "text" in suites:
        data["sciq_text"] = ("test", _load("sciq", options, settings, fingerprints))
    text_tools = _text_tools(options, settings, registry, console) if "text" in suites else None
    if "mcq" in suites and options.local and entry.manifest.mcq_calibration is not None \
            and entry.manifest.mcq_calibration.reads_question_domain:
        from zephyr.encoder import EncoderError, minilm_folder

        try:  # `auto` embeds every question after the engine's scoring: a missing encoder fails now, not then
            minilm_folder()
        except EncoderError as exc:
            raise EvalError(f"{entry.name}'s record reads each question's domain: {exc}") from None

    engine = None
    if options.local and needs_transformers(entry):
        from evals.hf_letter import TransformersEngine

        console.print(f"loading {entry.path} with transformers (bitsandbytes without CUDA: mcq suite only) ...")
        engine = TransformersEngine(entry.path)
    elif options.local:
        from evals.engine import EvalEngine

        console.print(f"starting vLLM on {entry.path} ...")
        engine = EvalEngine(entry.path, settings)
    runs = []
    try:
        generations: dict[str, dict[str, str]] = {}
        def save(suite: str, measurements: list[Measurement], started: float, via_server: bool = False) -> None:
            measurements = [m.model_copy(update={"data_digest": {
                name: fingerprints[name] for name in data_read(m.benchmark, m.metric) if name in fingerprints}})
                for m in measurements]
            read = sorted({name for m in measurements for name in m.data_digest})
            # GSM8K's few-shot examples come from the local train split whatever --data says
            sources = {name: str(settings.data_dir) if name == "gsm8k:train" else
                       options.sources.get(name, str(settings.data_dir)) for name in read}
            # A run through the server names the server only: the local engine's dtype is not what computed it
            # (the gate notes rows computed in other dtypes).
            computed_by = {"server": options.server} if via_server else (engine.engine_info if engine else {})
            run = EvalRun.of_entry(entry, suite, limit=options.limit, measurements=measurements,
                                   engine=computed_by, data=sources)
            path = store.save(run)
            for key, value in store.chosen_summary(entry.name, {m.key for m in measurements}).items():
                registry.record_eval(entry.name, key, value, made_at=entry.manifest.created_at)
            console.print(f"{suite}: {len(measurements)} measurements in {time.perf_counter() - started:.0f} s "
                          f"-> {path}")
            runs.append(run)

        for suite in suites:
            started = time.perf_counter()
            if suite == "mcq":
                measurements = _mcq_suite(engine, data, mcq_names, options, console, entry.manifest.mcq_calibration)
                if options.server:
                    if measurements:  # saved first: a server that fails must not cost the in-process results
                        save(suite, measurements, started)
                        started = time.perf_counter()
                    # Through the server only, its answers are compared with the newest stored in-process ones.
                    stored = store.latest(entry.name) if not measurements else None
                    measurements = _mcq_server(data, mcq_names, options, console,
                                               measurements or (stored.measurements if stored else []),
                                               stored=not measurements, fingerprints=fingerprints)
                    save(suite, measurements, started, via_server=True)
                    continue
            elif suite == "gsm8k":
                measurements = _gsm8k_suite(engine, data, options, settings)
                generations["gsm8k"] = measurements[0].details["generations"]
            else:
                measurements = _text_suite(engine, data, options, settings, text_tools, generations, console)
            if suite in ("gsm8k", "text"):
                for m in measurements:  # what generated the answers, which the gate compares only when equal
                    m.details["conditions"] = generation_conditions(options, settings)
            save(suite, measurements, started)
    finally:
        if engine is not None:
            engine.shutdown()
    return runs


def _mcq_suite(engine: Any, data: dict, names: list[str], options: RunOptions, console: Console,
               calibration: mcq.MCQCalibration | None = None) -> list[Measurement]:
    """Letter format and cloze in process; then `auto` (/mcq's default method, through the model's calibration
    record) from their per-option scores."""
    from evals import mcq_eval

    out: list[Measurement] = []
    mode = " (explain)" if options.explain else ""
    auto = mcq.plan("auto", calibration)
    computed_in = (getattr(engine, "engine_info", None) or {}).get("dtype")
    if calibration is not None and calibration.dtype not in (None, computed_in) and computed_in is not None:
        # as the service warns at start: `auto` is then measured on scores its weights were not fitted on
        console.print(f"[yellow]the calibration record was fitted on scores computed in {calibration.dtype}, and "
                      f"this engine computes in {computed_in}: auto's accuracy and confidences are measured on other "
                      f"scores than its weights were chosen on; ZEPHYR_DTYPE={calibration.dtype} measures what "
                      "the record was fitted for[/]")
    if engine is not None:
        for name in names if options.letter else []:
            split, items = data[name]
            # vLLM's EvalEngine, or transformers for bitsandbytes on CPU (direct letters only, checked above)
            m = engine.letter(name, split, items, explain=True) if options.explain else \
                engine.letter(name, split, items)
            console.print(f"{name} letter format{mode}: {m.score:.1%} of {m.n} in {m.seconds:.1f} s")
            out.append(m)
        if options.cloze:
            if calibration is not None and calibration.demonstrations:
                console.print(f"cloze and the answer prior after the record's "
                              f"{calibration.demonstrations_source.get('count', '?')} demonstrations")
            with tempfile.TemporaryDirectory(prefix="zephyr-eval-") as workdir:
                cloze = mcq_eval.cloze(engine.lm_eval_model, {n: data[n] for n in names}, Path(workdir),
                                       auto.demonstrations)
            for m in cloze:
                console.print(f"{m.benchmark} {m.metric}: {m.score:.1%} of {m.n} (~{m.seconds:.0f} s)")
            cache = cloze[0].details.get("prefix_cache_all_benchmarks") if cloze else None
            if cache and cache["prompt_tokens"]:
                console.print(f"cloze prefix cache: {cache['cached_tokens']:,} of {cache['prompt_tokens']:,} prompt "
                              f"tokens reused; of {cache['requests']:,} requests, {cache['rescored']:,} scored again "
                              f"and {cache['first_token']:,} completed from {cache['context_requests']:,} "
                              f"context requests")
            out += cloze
            if hasattr(engine, "answer_prior"):  # cheap: a few tokens per option, no question
                for name in names:
                    m = engine.answer_prior(name, *data[name], context=auto.answer_prior_context,
                                            demonstrations=auto.demonstrations)
                    console.print(f"{name} answer prior alone: {m.score:.1%} of {m.n} in {m.seconds:.1f} s")
                    out.append(m)
        if ((auto.needs_letter and (options.explain or not options.letter)) or (auto.needs_cloze and not options.cloze)
                or (auto.needs_answer_prior and not any(m.metric == "answer_prior_acc" for m in out))):
            console.print(f"[yellow]auto ({auto.method}) not measured:[/] it needs the direct letter format and "
                          "cloze (and the answer prior, which the vLLM engine scores); run without --explain, "
                          "--no-letter and --no-cloze")
        else:
            head = auto.calibration.question_domain if auto.needs_domain and auto.calibration else None
            encoder = None
            if head is not None:
                from zephyr.encoder import load_encoder

                encoder = load_encoder()
            for name in names:
                split, items = data[name]
                domains = mcq_eval.question_domains(items, head, encoder) if head is not None else None
                scores = mcq_eval.option_scores(
                    items, next((x for x in out if x.key == f"{name}/letter_acc"), None),
                    next((x for x in out if x.key == f"{name}/cloze_acc"), None),
                    next((x for x in out if x.key == f"{name}/answer_prior_acc"), None), domains)
                m = mcq_eval.planned(name, split, items, scores, auto, method_metric("auto"))
                figures = m.details["calibration"]
                console.print(f"{name} auto ({auto.method}{', calibrated' if auto.calibrated else ''}): "
                              f"{m.score:.1%} of {m.n}, ECE {figures['ece']:.3f}, Brier {figures['brier']:.3f}")
                out.append(m)
    return out


def _mcq_server(data: dict, names: list[str], options: RunOptions, console: Console,
                local: list[Measurement], stored: bool = False,
                fingerprints: dict[str, str] | None = None) -> list[Measurement]:
    """The same methods through the server's /mcq/batch, each with how many answers equal the in-process ones
    (this run's, or with `stored` an earlier run's on the same data by `fingerprints`, on the questions both
    answered)."""
    from evals import mcq_eval

    out: list[Measurement] = []
    for method in ("explain" if options.explain else "letter", "auto"):
        for name in names:
            split, items = data[name]
            m = mcq_eval.via_server(options.server, options.api_key, name, split, items, method=method)
            console.print(f"{name} {method} via {options.server} ({m.details['method']}): {m.score:.1%} of "
                          f"{m.n} in {m.seconds:.1f} s")
            mine = next((x for x in local if x.benchmark == name and x.metric == method_metric(method)
                         and x.data_digest.get(name) in (None, (fingerprints or {}).get(name))), None)
            if mine is not None:
                answers = mine.details["answers"]
                common = [i for i in m.details["answers"] if i in answers]
                same = sum(answers[i] == m.details["answers"][i] for i in common)
                m.details["same_answer_as_local"] = same
                m.details["compared_with_local"] = len(common)
                console.print(f"  same answer as in process{' (the stored run)' if stored else ''}: {same} of "
                              f"{len(common)}")
            out.append(m)
    return out


def generation_conditions(options: RunOptions, settings: Settings) -> dict[str, Any]:
    """What shapes the generated answers besides the model: their token limits and the system prompt (by digest)."""
    system = settings.served_system_prompt
    return {"gsm8k_max_tokens": options.gsm8k_max_tokens, "text_max_tokens": TEXT_MAX_TOKENS,
            "system_prompt": hashlib.sha256(system.encode()).hexdigest()[:16] if system else None}


def _gsm8k_suite(engine: Any, data: dict, options: RunOptions, settings: Settings) -> list[Measurement]:
    from evals import gsm8k

    system = settings.served_system_prompt
    return gsm8k.evaluate(engine, data["gsm8k"][1], data["gsm8k_train"][1], system,
                          max_tokens=options.gsm8k_max_tokens)


@dataclass
class TextTools:
    reward_model: Any = None
    # which weights score: a registry entry's revision, else the folder's resolved path (same_judge compares it)
    reward_model_revision: str | None = None
    dialogrpt: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _text_tools(options: RunOptions, settings: Settings, registry: Registry, console: Console) -> TextTools:
    """Load the scorers before the engine starts: a missing DialogRPT is reported and skipped, a missing reward
    model named on the command line or a BERTScore backbone that cannot load is an error (found now, not after
    every answer is generated)."""
    from evals import textmetrics

    tools = TextTools()
    for metric, hub_name in textmetrics.DIALOGRPT_MODELS.items():
        path = options.dialogrpt.get(metric)
        if not path:
            tools.skipped[metric] = (f"{hub_name} weights not configured: pass --{metric.replace('_', '-')} "
                                     f"FOLDER (a download of {hub_name})")
            console.print(f"[yellow]skipping {metric}:[/] {tools.skipped[metric]}")
            continue
        try:
            tools.dialogrpt[metric] = textmetrics.DialogRPT.load(path, name=metric)
        except textmetrics.DialogRPTMissing as exc:
            tools.skipped[metric] = str(exc)
            console.print(f"[yellow]skipping {metric}:[/] {exc}")
    if options.reward_model:
        from offline.reward import RewardModel

        path = Path(options.reward_model)
        if not path.exists():
            rm_entry = registry.get(options.reward_model)
            if rm_entry.manifest.method != "rm":
                raise EvalError(f"--reward-model {options.reward_model!r} is a {rm_entry.manifest.method} model, not a "
                                "reward model (train one with `zephyr train rm`)")
            path = rm_entry.path
            tools.reward_model_revision = rm_entry.manifest.revision
        else:
            tools.reward_model_revision = f"folder:{path.resolve()}"
        try:
            tools.reward_model = RewardModel.load(path)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise EvalError(f"--reward-model {options.reward_model}: {exc}") from None
        # A folder of a causal LM would load with a freshly initialised scoring head: random scores, not rewards.
        if not any(name.endswith("ForSequenceClassification")
                   for name in tools.reward_model.model.config.architectures or ()):
            raise EvalError(f"--reward-model {options.reward_model} is not a sequence-classification (reward) model; "
                            "give a registry entry made with `zephyr train rm`, or such a folder")
    try:  # one pair loads the scorer, which stays cached for the suite
        textmetrics.bertscore(["a"], ["a"], model=options.bertscore_model, num_layers=options.bertscore_layers)
    except Exception as exc:  # a missing backbone, or a local folder whose weights do not load
        raise EvalError(f"--bertscore-model {options.bertscore_model or '(default)'}: {exc}") from None
    return tools


def _text_suite(engine: Any, data: dict, options: RunOptions, settings: Settings, tools: TextTools,
                generations: dict[str, dict[str, str]], console: Console) -> list[Measurement]:
    from evals import gsm8k, textmetrics

    system = settings.served_system_prompt
    sciq = [item for item in data["sciq_text"][1] if item.support]
    sciq_prompts = [[{"role": "user", "content": item.question}] for item in sciq]
    sciq_answers = engine.chat([with_system_prompt(p, system or None) for p in sciq_prompts], TEXT_MAX_TOKENS,
                               "sciq answers")
    gsm_items = data["gsm8k"][1]
    gsm_answers = generations.get("gsm8k")
    if gsm_answers is None:
        texts = engine.chat([gsm8k.messages_for(i, system, []) for i in gsm_items], options.gsm8k_max_tokens,
                            "gsm8k answers")
        gsm_answers = {i.id: t for i, t in zip(gsm_items, texts, strict=True)}
    sets = {
        "sciq_text": ([i.id for i in sciq], [i.question for i in sciq], sciq_answers, [i.support for i in sciq]),
        "gsm8k_text": ([i.id for i in gsm_items], [i.question for i in gsm_items],
                       [gsm_answers[i.id] for i in gsm_items],
                       [gsm8k.shot_solution(i) for i in gsm_items]),
    }
    out = []
    for benchmark, (ids, questions, answers, references) in sets.items():
        started = time.perf_counter()
        f1 = textmetrics.bertscore(answers, references, model=options.bertscore_model,
                                   num_layers=options.bertscore_layers)
        out.append(measurement(benchmark, "bertscore_f1", "test", dict(zip(ids, f1, strict=True)),
                               seconds=time.perf_counter() - started,
                               details={"backbone": options.bertscore_model or "all-MiniLM-L6-v2",
                                        "num_layers": options.bertscore_layers,  # the judge, with its backbone
                                        "samples": dict(list(zip(ids, answers, strict=True))[:20])}))
        shares = {i: textquality.repeated_ngram_share(a) for i, a in zip(ids, answers, strict=True)}
        out.append(measurement(benchmark, "looping", "test",
                               {i: float(textquality.is_looping(s)) for i, s in shares.items()},
                               details={"repeated_4gram_share": {i: round(s, 3) for i, s in shares.items()}}))
        # Shown beside looping, never gated: a model can stop looping by stopping after one sentence, which a
        # tutor's students would meet as a regression of its own.
        out.append(measurement(benchmark, "answer_words", "test",
                               {i: float(len(a.split())) for i, a in zip(ids, answers, strict=True)}))
        for metric, scorer in tools.dialogrpt.items():
            scores = scorer.score(questions, answers)
            out.append(measurement(benchmark, metric, "test", dict(zip(ids, scores, strict=True)),
                                   details={"dialogrpt_weights": Path(options.dialogrpt[metric]).name}))
    # Whether a chat answer is right, read against the options it was asked without (SciQ's keys are short texts):
    # a lower bound, since an answer may say the key in other words.
    verdicts = {i.id: benchmarks.answer_verdict(a, i.options, mcq.LETTERS.index(i.answer))
                for i, a in zip(sciq, sciq_answers, strict=True)}
    for metric, verdict in (("names_key", "right"), ("names_distractor", "wrong")):
        out.append(measurement("sciq_text", metric, "test", {i: float(v == verdict) for i, v in verdicts.items()},
                               details={"verdicts": verdicts} if metric == "names_key" else {}))
    if tools.reward_model is not None:
        conversations = [p + [{"role": "assistant", "content": a}] for p, a in zip(sciq_prompts, sciq_answers,
                                                                                     strict=True)]
        scores = {i.id: s for i, s in zip(sciq, tools.reward_model.score(conversations), strict=True)}
        # A score that is not a number (weights that overflow on one input) is no reward: left out and counted,
        # so the mean, the report's plots and the win rates read the rest.
        finite = {i: s for i, s in scores.items() if math.isfinite(s)}
        if len(finite) < len(scores):
            console.print(f"[yellow]the reward model scored {len(scores) - len(finite)} answers as a non-number; "
                          "left out of rm_score[/]")
        out.append(measurement("rm", "rm_score", "test", finite, details={
            "reward_model": options.reward_model, "reward_model_revision": tools.reward_model_revision,
            "prompts": "sciq test questions", "non_finite": len(scores) - len(finite)}))
    if tools.skipped:
        out[0].details["skipped"] = tools.skipped
    console.print(", ".join(f"{m.benchmark} {m.metric}: {m.score:.3f}" for m in out))
    return out


__all__ = ["RunOptions", "EvalError", "run", "check_options", "SUITES", "SUITE_BENCHMARKS"]
