"""`zephyr train sft|rm|rs|dpo|kto|grpo` and `zephyr data science|restate|cloze|grpo|hh|review|clean`.

Recipes and data are validated before a model loads; errors end in one line that says what to fix, exit 1."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import console, csv, fail, load_settings, os_reason, unwind_on_sigterm
from zephyr.console import make_console
from zephyr.paths import check_writable, written_as_a_stream
from zephyr.registry import Registry, RegistryError
from zephyr.schemas import (
    KTOExample,
    PreferencePair,
    SFTExample,
    TextPreferencePair,
    TextSFTExample,
    VerifiablePrompt,
    write_jsonl,
)
from zephyr.settings import DEFAULT_MODEL, Settings

train_app = typer.Typer(help="Align a registry model with TRL: SFT, reward model, rejection sampling, DPO, KTO, GRPO.",
                        no_args_is_help=True)
data_app = typer.Typer(help="Build and clean training data (JSON Lines in the zephyr/schemas.py formats).",
                       no_args_is_help=True)
progress = make_console(stderr=True)  # training's own progress and logs; results go to stdout

SCHEMA_BY_FORMAT = {"dpo": PreferencePair, "kto": KTOExample, "sft": SFTExample}
# What `zephyr data clean` reads: also the files `data cloze` and `data grpo` write (with --no-clean, to clean later).
CLEAN_FORMATS = {**SCHEMA_BY_FORMAT, "cloze-dpo": TextPreferencePair, "cloze-sft": TextSFTExample,
                 "grpo": VerifiablePrompt}


# ---- train -------------------------------------------------------------------------------------------------------

Recipe = Annotated[Path, typer.Option("--recipe", help="training/recipes/<name>.yaml")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. trainer.beta=0.2 lora.r=8")]
Fresh = Annotated[bool, typer.Option("--fresh", help="discard the run folder's checkpoints and start over")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace a registry model of the same name")]


def run_method(method: str, recipe_path: Path, overrides: list[str] | None, fresh: bool, overwrite: bool) -> None:
    from training.recipes import RecipeError, load_recipe
    from training.run import TrainingError
    from zephyr.memory import EngineWontStart  # rs samples with vLLM in process

    settings = load_settings()
    try:
        recipe = load_recipe(recipe_path, overrides or [], method=method)
        Registry(settings.models_dir).get(recipe.model)
        if recipe.method == "rs":
            from training.rs import run_rejection_sampling

            result = run_rejection_sampling(recipe, settings, recipe_path=recipe_path, fresh=fresh,
                                            overwrite=overwrite, console=progress)
        else:
            from training.run import train

            result = train(recipe, settings, recipe_path=recipe_path, fresh=fresh, overwrite=overwrite,
                           console=progress)
    except (RecipeError, RegistryError, TrainingError, EngineWontStart) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # a model folder transformers cannot load, a full disk, a registry not writable
        raise fail(f"the {method} run failed: {os_reason(exc)}; "
                   "a run that finished training keeps its folder under ZEPHYR_HOME/runs (`zephyr train register` "
                   "registers it)") from None
    _report(result, method)


def _report(result: Any, method: str) -> None:
    if result.entry is None:  # a non-main process of `accelerate launch`: the main one reports
        return
    table = Table("metric", "value", title=f"{result.entry.name} ({method})")
    for key, value in sorted(result.metrics.items()):
        if isinstance(value, int | float):
            table.add_row(key, f"{value:.4g}")
    console.print(table)
    console.print(f"registered [bold]{result.entry.name}[/] (parent {result.entry.manifest.parent}) at "
                    f"{result.entry.path}; run folder {result.run_dir}")


@train_app.command("register")
def train_register(recipe: Recipe, overrides: Overrides = None, overwrite: Overwrite = False) -> None:
    """Register a run trained on another machine (a GPU box without this service): copy its run folder into
    ZEPHYR_HOME/runs/ and its data files to the recipe's paths, then merge and register it here."""
    from training.recipes import RecipeError, load_recipe
    from training.run import TrainingError, register_run

    settings = load_settings()
    try:
        loaded = load_recipe(recipe, overrides or [])
        result = register_run(loaded, settings, recipe_path=recipe, overwrite=overwrite)
    except (RecipeError, RegistryError, TrainingError) as exc:
        raise fail(str(exc)) from None
    _report(result, loaded.method)


def _command(method: str, doc: str) -> None:
    def command(recipe: Recipe, overrides: Overrides = None, fresh: Fresh = False,
                overwrite: Overwrite = False) -> None:
        unwind_on_sigterm()
        run_method(method, recipe, overrides, fresh, overwrite)

    command.__doc__ = doc
    train_app.command(method)(command)


_command("sft", "Supervised fine-tuning on `messages` conversations.")
_command("rm", "Reward model: a one-logit classifier on preference pairs; reports held-out agreement.")
_command("rs", "Rejection sampling: best of n answers by the reward model, then SFT on them.")
_command("dpo", "Direct preference optimization on preference pairs.")
_command("kto", "Kahneman-Tversky optimization on unpaired good/bad examples.")
_command("grpo", "Online RL (GRPO): the model answers MCQ explain prompts, verifiable rewards (and optionally a "
                 "reward model) score its answers.")


# ---- data --------------------------------------------------------------------------------------------------------

Out = Annotated[Path, typer.Option("--out", dir_okay=False, help="JSON Lines file to write")]  # refused before work
TrainingSources = Annotated[str, typer.Option(help="comma-separated name:split training sources (no test or "
                                                   "calibration splits)")]
DEFAULT_TRAINING_SOURCES = "arc_easy:train,arc_challenge:train,openbookqa:train"
LimitPerSource = Annotated[int | None, typer.Option(min=1, help="first N questions of each source (MMLU: its "
                                                                   "subjects in turn)")]


@dataclass(frozen=True)
class CleanFlags:
    """The cleaning flags every `zephyr data` command takes (training/data/clean.py does the work)."""

    no_clean: bool = False
    no_pii: bool = False
    near_dup: float = 0.9
    max_chars: int = 8000
    no_decontaminate: bool = False
    against: str = "all"


_CLEAN_OPTIONS = {
    "no_clean": Annotated[bool, typer.Option("--no-clean", help="skip cleaning (PII, duplicates, lengths, test "
                                                                "overlap)")],
    "no_pii": Annotated[bool, typer.Option("--no-pii", help="keep text the PII recognizers would redact")],
    "near_dup": Annotated[float, typer.Option("--near-dup", min=0.0, max=1.0, help="Jaccard similarity above which "
                                              "a record is a near-duplicate (0 = off)")],
    "max_chars": Annotated[int, typer.Option("--max-chars", min=1, help="drop records with a longer reply")],
    "no_decontaminate": Annotated[bool, typer.Option("--no-decontaminate", help="keep records overlapping "
                                                     "evaluation test sets")],
    "against": Annotated[str, typer.Option("--against", help="benchmarks whose reported split is checked for "
                                           "overlap: all, or a comma-separated list")],
}


def clean_flags(*, skippable: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Adds the cleaning options to a command's signature (so Typer shows them) and hands the command one
    `clean: CleanFlags` instead of six parameters. `skippable=False` drops --no-clean (`data clean`)."""
    names = [name for name in _CLEAN_OPTIONS if skippable or name != "no_clean"]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name != "clean"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_CLEAN_OPTIONS[name],
                                   default=getattr(CleanFlags, name)) for name in names]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            flags = CleanFlags(**{name: kwargs.pop(name) for name in names})
            _check_cleaning_installed(flags, skippable)
            for name in OUTPUT_OPTIONS:  # `--out=~/x.jsonl` reaches us unexpanded: checked and written as one path
                if kwargs.get(name) is not None:
                    kwargs[name] = kwargs[name].expanduser()
            _check_outputs([kwargs[name] for name in OUTPUT_OPTIONS if kwargs.get(name) is not None])
            return command(*args, clean=flags, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=kept + added)
        return wrapper

    return decorate


# The options a data command writes to (`--out`, `--kto-out`, `--sft-out`; `--answers-out` keeps the samples).
OUTPUT_OPTIONS = ("out", "kto_out", "sft_out", "answers_out")


def _check_outputs(paths: list[Path]) -> None:
    """Before any sampling: two outputs of one file would overwrite each other, and a folder that cannot be made or
    written (under a file, a read-only mount) would fail the write after tens of minutes of sampling."""
    files = [path.resolve() for path in paths if not written_as_a_stream(path)]  # /dev/stdout twice appends twice
    if len(set(files)) != len(files):
        raise fail(f"two outputs name one file ({', '.join(map(str, paths))}): each would overwrite the other")
    for path in paths:
        try:
            check_writable(path)  # as given: /dev/stdout resolves to a pipe's name, which is no file
        except OSError as exc:
            raise fail(f"cannot write {path}: {exc.strerror or exc}"
                       f"{f' ({exc.filename})' if exc.filename and exc.filename != str(path) else ''}") from None


@functools.lru_cache(maxsize=2)
def _cached_index(data_dir: Path, names: tuple[str, ...]) -> Any:
    from training.data.clean import ContaminationIndex

    return ContaminationIndex.from_benchmarks(data_dir, list(names))


def _contamination_index(clean: CleanFlags) -> Any:
    """The test-set index cleaning checks against (None with --no-decontaminate), read once for a command's files."""
    from training.data.clean import ALL_BENCHMARKS

    if clean.no_decontaminate:
        return None
    names = ALL_BENCHMARKS if clean.against == "all" else csv(clean.against) or []
    try:
        if not names:  # an empty list would check nothing without saying so
            raise ValueError("--against names no benchmark; name some, `all`, or turn the check off with "
                             "--no-decontaminate")
        return _cached_index(load_settings().data_dir, tuple(names))
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None


def _check_cleaning_installed(clean: CleanFlags, skippable: bool) -> None:
    """Before any sampling: a machine without the cleaning libraries (a GPU box with only the training stack) would
    otherwise sample for minutes and fail when it writes. Imported, not only found: a library is as good as its own
    dependencies."""
    import importlib

    needed = {} if clean.no_clean else {
        **({"zephyr.pii": "PII redaction (Presidio)"} if not clean.no_pii else {}),
        **({"datasketch": "near duplicates (datasketch)"} if clean.near_dup > 0 else {}),
    }
    missing = []
    for module, step in needed.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{step}: {exc}")
    if missing:
        raise fail(f"cleaning cannot run here ({'; '.join(missing)}): install the project's dependencies (make setup),"
                   " or pass --no-pii or --near-dup 0 to skip that step"
                   + (", or --no-clean and run `zephyr data clean` on the file where they are installed"
                      if skippable else ""))


def _print_stats(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table("", "", title=title)
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def _clean_and_write(records: list[Any], out: Path, schema: type, *, clean: CleanFlags, title: str,
                     private: bool = False) -> int:
    if not clean.no_clean:
        from training.data.clean import CleanOptions
        from training.data.clean import clean as clean_records

        options = CleanOptions(redact_pii=not clean.no_pii, near_dup_threshold=clean.near_dup or None,
                               max_chars=clean.max_chars, decontaminate=not clean.no_decontaminate)
        records, report = clean_records(records, options, index=_contamination_index(clean))
        report_table = report.table()
        report_table.title = f"cleaning {title}"
        console.print(report_table)
    else:  # stamped, so that `zephyr train` refuses them until `zephyr data clean` has run on the file
        from training.data.clean import stamped_cleaned

        records = [stamped_cleaned(record, False) for record in records]
    try:  # its folder was made before any work (`clean_flags`' output check)
        count = write_jsonl(out, records, private=private)
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror or exc}") from None
    console.print(f"wrote {count} {schema.__name__} records to {out}")
    return count


def _say_reserved(reserved: dict[str, int]) -> None:
    for source, count in reserved.items():
        console.print(f"{source}: its first {count} questions left out (`zephyr eval calibrate` fits on them)")


def _questions_and_model(sources: str, limit_per_source: int | None, model: str | None,
                         clean: CleanFlags) -> tuple[Settings, list[Any], Any]:
    """What a sampling builder starts from: the settings, the training questions (without the ones `zephyr eval
    calibrate` fits on, as every MCQ builder reads them) and the registry entry that answers (None without a
    `model`: nothing is sampled)."""
    from offline.benchmarks import SourceError
    from training.data import cloze

    settings = load_settings()
    try:
        items, reserved = cloze.load_items(csv(sources) or [], settings.data_dir, limit_per_source,
                                           exclude_reported=not clean.no_decontaminate)
        _say_reserved(reserved)
        entry = Registry(settings.models_dir).get(model) if model is not None else None
    except (SourceError, RegistryError) as exc:
        raise fail(str(exc)) from None
    if not clean.no_clean:  # --against read now (cached for the write): a typo fails before the sampling, not after
        _contamination_index(clean)
    return settings, items, entry


@contextmanager
def _sampling_engine(entry: Any, settings: Settings, seed: int) -> Iterator[Any]:
    """vLLM in process for a builder's sampling, shut down however the sampling ends."""
    unwind_on_sigterm()
    from offline.engine import OfflineEngine
    from zephyr.memory import EngineWontStart

    try:  # the engine's seed fixes the draw
        engine = OfflineEngine(entry.path, settings.model_copy(update={"seed": seed}))
    except (EngineWontStart, RegistryError) as exc:  # too little memory, a block size the CPU backend refuses
        raise fail(str(exc)) from None
    try:
        yield engine
    finally:
        engine.shutdown()


@data_app.command("science")
@clean_flags()
def data_science(
    out: Out,
    sources: Annotated[str, typer.Option(help="comma-separated name:split training sources (never test or "
                                              "calibration splits)")] =
    "arc_easy:train,arc_challenge:train",
    model: Annotated[str, typer.Option(help="registry model that answers")] = DEFAULT_MODEL,
    k: Annotated[int, typer.Option("--k", min=0, max=32, help="explanations sampled per question")] = 4,
    explain_questions: Annotated[int | None, typer.Option(min=0, help="sample explanations for the first N questions "
                                                                "only (direct-format pairs are made for all)")] = None,
    limit_per_source: LimitPerSource = None,
    temperature: Annotated[float, typer.Option(min=0.05, max=2.0)] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=8, help="explanation length limit")] = 128,
    kto_out: Annotated[Path | None, typer.Option(dir_okay=False,
                                                 help="also write the unpaired (KTO) examples here")] = None,
    negatives: Annotated[str, typer.Option(help="rejected letter of a direct pair: balanced (a wrong letter drawn "
                                                "uniformly) or mistake (the wrong letter the model ranks highest)")]
    = "balanced",
    seed: int = 0,
    clean: CleanFlags = CleanFlags(),
) -> None:
    """Verifiable science pairs: the model's sampled explanations and letters, labelled by the answer key."""
    from training.data import science

    if negatives not in science.NEGATIVES:
        raise fail(f"--negatives must be one of {', '.join(science.NEGATIVES)}, not {negatives!r}")
    settings, items, entry = _questions_and_model(sources, limit_per_source, model, clean)
    with _sampling_engine(entry, settings, seed) as engine:
        samples, direct, skipped, cut_off = science.sample(engine.llm, engine.tokenizer, items, k=k,
                                                  explain_items=explain_questions, temperature=temperature,
                                                  max_tokens=max_tokens)
    pairs, unpaired, stats = science.build(items, samples, direct, seed=seed, negatives=negatives)
    stats.skipped, stats.cut_off = skipped, cut_off
    _print_stats(f"science data from {model}", stats.rows())
    _clean_and_write(pairs, out, PreferencePair, clean=clean, title="preference pairs")
    if kto_out is not None:
        _clean_and_write(unpaired, kto_out, KTOExample, clean=clean, title="unpaired examples")


@data_app.command("chat-answers")
@clean_flags()
def data_chat_answers(
    out: Out,
    sources: TrainingSources = DEFAULT_TRAINING_SOURCES,
    model: Annotated[str, typer.Option(help="registry model that answers")] = DEFAULT_MODEL,
    k: Annotated[int, typer.Option("--k", min=2, max=32, help="chat answers sampled per question")] = 4,
    limit_per_source: LimitPerSource = None,
    temperature: Annotated[float, typer.Option(min=0.05, max=2.0)] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.05, max=1.0)] = 0.9,
    max_tokens: Annotated[int, typer.Option(min=8, max=1024, help="answer length limit (the text suite's is "
                                                                   "128)")] = 128,
    rejected: Annotated[str, typer.Option(help="the rejected reply: wrong (names a distractor), wrong-or-neither "
                                               "(else one that names no option) or wrong-or-swapped (else the "
                                               "chosen reply with a distractor's text in place of the key's)")]
    = "wrong-or-neither",
    answers_out: Annotated[Path | None, typer.Option(dir_okay=False,
                                                     help="also write every sampled answer here, to rebuild pairs "
                                                          "under another rule later")] = None,
    answers_from: Annotated[Path | None, typer.Option(help="build from answers sampled earlier instead of sampling: "
                                                           "a file --answers-out wrote, or pairs this command wrote "
                                                           "(their sampled replies); the sampling options are not "
                                                           "used")] = None,
    backend: Annotated[str, typer.Option(help="what samples: vllm (in process), or transformers (a GPU machine "
                                              "without vLLM; bf16 on CUDA)")] = "vllm",
    batch_size: Annotated[int | None, typer.Option(min=1, max=8192, help="rows a transformers batch generates "
                                                   "(default 512 on a GPU, 64 on a CPU)")] = None,
    seed: int = 0,
    clean: CleanFlags = CleanFlags(),
) -> None:
    """Chat-answer pairs: the model's own sampled chat answers to bare training questions, a right one (names the
    key's text, ended, no loop) against a wrong one."""
    from training.data import chat_answers

    if rejected not in chat_answers.REJECTED:
        raise fail(f"--rejected must be one of {', '.join(chat_answers.REJECTED)}, not {rejected!r}")
    if backend not in ("vllm", "transformers"):
        raise fail(f"--backend must be vllm or transformers, not {backend!r}")
    if answers_from is not None and answers_out is not None:
        raise fail("--answers-out writes the answers sampled here; with --answers-from nothing is sampled")
    if answers_from is not None and not answers_from.is_file():
        raise fail(f"--answers-from {answers_from}: no such file")
    # answers read from a file need no model in this registry: they were sampled elsewhere
    settings, items, entry = _questions_and_model(sources, limit_per_source,
                                                  model if answers_from is None else None, clean)
    questions, refused, left_out = chat_answers.askable(items)
    system = settings.served_system_prompt
    if answers_from is not None:
        try:
            samples = chat_answers.read_answers(answers_from)
        except ValueError as exc:
            raise fail(str(exc)) from None
        asked = {q.id for q in questions}
        if not asked & samples.keys():
            raise fail(f"--answers-from {answers_from} answers none of these {len(questions)} questions: sample them "
                       "with the same --sources and --limit-per-source")
        console.print(f"answers to {len(asked & samples.keys())} of {len(questions)} questions read from "
                      f"{answers_from} ({len(samples.keys() - asked)} for questions not asked here, left out)")
    elif backend == "transformers":
        samples = chat_answers.sample_transformers(entry.path, questions, system, k=k, temperature=temperature,
                                                   top_p=top_p, max_tokens=max_tokens, batch_size=batch_size,
                                                   seed=seed)
    else:
        with _sampling_engine(entry, settings, seed) as engine:
            samples = chat_answers.sample(engine.llm, engine.tokenizer, questions, system, k=k,
                                          temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    if answers_out is not None:
        console.print(f"wrote {chat_answers.write_answers(answers_out, samples)} sampled answers to {answers_out}")
    pairs, stats = chat_answers.build(questions, samples, system, rejected=rejected, seed=seed)
    stats.questions, stats.skipped, stats.needs_options = len(items), refused, left_out
    _print_stats(f"chat-answer pairs from {model}" if answers_from is None
                 else f"chat-answer pairs from the answers in {answers_from}", stats.rows())
    _clean_and_write(pairs, out, PreferencePair, clean=clean, title="preference pairs")


@data_app.command("restate")
@clean_flags()
def data_restate(
    out: Out,
    sources: Annotated[str, typer.Option(help="comma-separated name:split training sources (never test or "
                                              "calibration splits)")] =
    "arc_easy:train,arc_challenge:train,openbookqa:train",
    limit_per_source: LimitPerSource = None,
    seed: int = 0,
    clean: CleanFlags = CleanFlags(),
) -> None:
    """Explain-format pairs from the answer key alone (no model needed): the reply restates the key's text, then
    its letter; rejected replies restate a wrong option, or the key with a wrong letter."""
    from offline.benchmarks import SourceError
    from training.data import cloze, science

    settings = load_settings()
    try:
        items, reserved = cloze.load_items(csv(sources) or [], settings.data_dir, limit_per_source,
                                           exclude_reported=not clean.no_decontaminate)
        _say_reserved(reserved)
    except SourceError as exc:
        raise fail(str(exc)) from None
    accepted, refused = cloze.usable(items)
    pairs, kinds = science.restate_pairs([item for item, _ in accepted], seed=seed)
    console.print(f"{len(pairs)} restate pairs from {len(items)} questions ({refused} "
                         f"skipped: options the MCQ format refuses); rejected: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    _clean_and_write(pairs, out, PreferencePair, clean=clean, title="preference pairs")


@data_app.command("cloze")
@clean_flags()
def data_cloze(
    out: Out,
    sft_out: Annotated[Path | None, typer.Option(dir_okay=False, help="also write SFT examples (the context, then "
                                                                      "the key's text)")] = None,
    sources: TrainingSources = DEFAULT_TRAINING_SOURCES,
    distractors: Annotated[int, typer.Option(min=1, max=9, help="pairs per question, each against another "
                                                                "distractor")] = 1,
    limit_per_source: LimitPerSource = None,
    seed: int = 0,
    clean: CleanFlags = CleanFlags(),
) -> None:
    """Cloze-form pairs from the answer key alone (no model needed): each question as /mcq's cloze method scores
    it, the key's text chosen against a distractor's; --sft-out adds the context and the key's text."""
    from offline.benchmarks import SourceError
    from training.data import cloze

    settings = load_settings()
    try:
        items, reserved = cloze.load_items(csv(sources) or [], settings.data_dir, limit_per_source,
                                           exclude_reported=not clean.no_decontaminate)
    except SourceError as exc:
        raise fail(str(exc)) from None
    pairs, examples, stats = cloze.cloze_records(items, seed=seed, distractors=distractors)
    stats.reserved = reserved
    _print_stats("cloze data from the answer key", stats.rows())
    _clean_and_write(pairs, out, TextPreferencePair, clean=clean, title="cloze pairs")
    if sft_out is not None:
        _clean_and_write(examples, sft_out, TextSFTExample, clean=clean, title="cloze SFT examples")


@data_app.command("grpo")
@clean_flags()
def data_grpo(
    out: Out,
    sources: TrainingSources = DEFAULT_TRAINING_SOURCES,
    limit_per_source: LimitPerSource = None,
    seed: int = 0,
    clean: CleanFlags = CleanFlags(),
) -> None:
    """Verifiable prompts for `zephyr train grpo`: each training question as /mcq with explain asks it, with the
    key's letter the rewards check (no model needed)."""
    from offline.benchmarks import SourceError
    from training.data import cloze, verifiable

    settings = load_settings()
    try:
        items, reserved = cloze.load_items(csv(sources) or [], settings.data_dir, limit_per_source,
                                           exclude_reported=not clean.no_decontaminate)
    except SourceError as exc:
        raise fail(str(exc)) from None
    prompts, stats = verifiable.explain_prompts(items, seed=seed)
    stats.reserved = reserved
    _print_stats("verifiable MCQ prompts from the answer key", stats.rows())
    _clean_and_write(prompts, out, VerifiablePrompt, clean=clean, title="verifiable prompts")


@data_app.command("hh")
@clean_flags()
def data_hh(
    out: Out,
    source: Annotated[Path | None, typer.Option("--input", help="hh-rlhf .jsonl or .jsonl.gz (the only hh-rlhf split "
                                                "here; rm-hh.yaml holds out part of it by seed) "
                                                "\\[default: $ZEPHYR_DATA_DIR/hh-rlhf-helpful-base/test.jsonl.gz]")]
    = None,
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    clean: CleanFlags = CleanFlags(),
) -> None:
    """Preference pairs from Anthropic hh-rlhf transcripts."""
    from training.data.builders import BuildError, from_hh_rlhf

    settings = load_settings()
    path = source or settings.data_dir / "hh-rlhf-helpful-base" / "test.jsonl.gz"
    try:
        # The tutor's system prompt, as the service shows chats to the model: a reward model trained on these pairs
        # ranks rejection sampling's answers, which are sampled after it.
        pairs, skipped = from_hh_rlhf(path, limit, system_prompt=settings.served_system_prompt)
    except BuildError as exc:
        raise fail(str(exc)) from None
    console.print(f"{len(pairs)} pairs from {path} ({skipped} malformed transcripts skipped)")
    _clean_and_write(pairs, out, PreferencePair, clean=clean, title="hh-rlhf")


@data_app.command("review")
@clean_flags()
def data_review(
    source: Annotated[Path, typer.Option("--input", help="a `zephyr review export` file (dpo, kto or sft)")],
    out: Out,
    include_unfinished: Annotated[bool, typer.Option(
        "--include-unfinished", help="Keep answers cut off (at max_tokens or by the client's stop strings) or written "
        "by the safety guard, which an "
        "export made to count verdicts holds (a smoke test's short answers; never for a model you will serve)")]
    = False,
    clean: CleanFlags = CleanFlags(),
) -> None:
    """Training data from reviewers' verdicts: validate an export, leave out what it kept only for counting
    verdicts (`eval gate --reviews`), and clean it."""
    from collections import Counter

    from training.data.builders import BuildError, from_review_export

    load_settings()  # a bad configuration says so before the file is read
    left_out: Counter[str] = Counter()
    try:
        fmt, records = from_review_export(source, include_unfinished=include_unfinished, left_out=left_out)
    except BuildError as exc:
        raise fail(str(exc)) from None
    console.print(f"{len(records) + left_out.total()} {fmt} records in {source}")
    # An export made to count verdicts (`eval gate --reviews`) also holds records that are no training examples.
    for why, count in left_out.items():
        console.print(f"left out {count} kept for counting verdicts, not for training: {why}")
    if not records:
        raise fail(f"no record of {source} is fit to train on: export with neither --include-flagged nor "
                   "--include-unfinished, and answers long enough to end by themselves")
    _clean_and_write(records, out, SCHEMA_BY_FORMAT[fmt], clean=clean, title=str(source),
                     private=True)  # students' conversations, as the export was


@data_app.command("clean")
@clean_flags(skippable=False)
def data_clean(
    source: Annotated[Path, typer.Option("--input", help="JSON Lines in one of the schemas")],
    out: Out,
    fmt: Annotated[str, typer.Option("--format", help="dpo (preference pairs), kto, sft, cloze-dpo and cloze-sft "
                                                      "(`data cloze`'s pairs and SFT examples), or grpo")],
    clean: CleanFlags = CleanFlags(),
) -> None:
    """Clean any data file: PII, exact and near duplicates, lengths, overlap with evaluation test sets."""
    from zephyr.schemas import DataFileError, read_jsonl

    if fmt not in CLEAN_FORMATS:
        raise fail(f"--format must be one of {', '.join(CLEAN_FORMATS)}, not {fmt!r}")
    if not source.is_file():
        raise fail(f"{source} is a folder; give a JSON Lines file" if source.is_dir() else f"{source} does not exist")
    load_settings()  # a bad configuration says so before the file is read
    try:
        records = list(read_jsonl(source, CLEAN_FORMATS[fmt]))
    except DataFileError as exc:
        raise fail(str(exc)) from None
    # private: the file may be a review export's (students' conversations)
    _clean_and_write(records, out, CLEAN_FORMATS[fmt], clean=clean, title=str(source),
                     private=True)
