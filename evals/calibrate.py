"""`zephyr eval calibrate`: score every validation question of the MCQ benchmarks by letter and by cloze, fit /mcq's
`auto` for one registry model (evals/calibration.py), and write the record into its zephyr.json.

Only validation data is read. OpenBookQA's local copy has no test split, so its dev split is the one we report:
its calibration questions come from its train split instead. A calibration question (or a demonstration) that a
reported split holds, with the same options, is left out (`Contamination`)."""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from evals import calibration, mcq_eval
from evals.results import ResultStore
from evals.run import needs_transformers
from offline.benchmarks import (
    BENCHMARKS,
    CALIBRATION_LIMITS,
    CALIBRATION_SPLITS,
    MCQ_BENCHMARKS,
    DatasetError,
    first,
    load,
    reported_copy,
    without_questions_of,
)
from zephyr import mcq
from zephyr.numerics import served_dtype
from zephyr.paths import write_text_atomic
from zephyr.registry import QUANT_METHODS, Registry, RegistryEntry
from zephyr.schemas import MCQItem
from zephyr.settings import Settings

# Each MCQ benchmark's validation split, or its train split where validation is the split we report (defined in
# offline.benchmarks, so training builders leave the same questions out).
OPENBOOKQA_TRAIN_QUESTIONS = CALIBRATION_LIMITS["openbookqa"]

# The solved examples every cloze prompt of a calibrated model starts with: drawn by a fixed seed from ARC-Easy's
# train split (never calibrated on, never reported), among short four-option questions so that they cost few
# tokens. Five were chosen over none on the validation splits (docs/evaluation.md, "Demonstrations").
DEMONSTRATIONS_DEFAULT = 5
DEMONSTRATIONS_MAX = 16
DEMONSTRATIONS_FROM = ("arc_easy", "train")
DEMONSTRATIONS_SEED = 0
DEMONSTRATION_MAX_QUESTION_CHARS = 120

# The question-domain head (mcq.QuestionDomain) learns which set a question reads like from training splits only,
# never a split calibration reads or one we report: ARC-Easy and ARC-Challenge train, OpenBookQA train past the
# questions calibration reads, and MMLU's dev split (five solved questions a subject). SciQ has no local train
# split; its passage is a confidence feature of its own.
QUESTION_DOMAIN_TRAINING = {"arc_challenge": ("train", 0), "arc_easy": ("train", 0),
                            "openbookqa": ("train", OPENBOOKQA_TRAIN_QUESTIONS), "mmlu": ("dev", 0)}


class CalibrationError(ValueError):
    """A calibration that cannot start as asked; the message says what to change."""


class Contamination:
    """Which questions a reported split holds (each benchmark's `eval_split`: test, or OpenBookQA's dev): the same
    question with the same options, in any order (`offline.benchmarks.reported_copy`, as `mcq_training_items`).
    A copy carries the test question's own label into the fit. Training cleaning's text overlap is not applied:
    it guards against memorizing passages, which a fit of a dozen weights over scores cannot do, and on MMLU val it
    flags 207 more questions that only share a template or a stretch of passage with a test question ("For which of
    these two scenarios ..."), not an answer. Only the reported splits the data folder has are read (`against`;
    `missing` names the others)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        self.against = [name for name in MCQ_BENCHMARKS
                        if (self.data_dir / BENCHMARKS[name].splits[BENCHMARKS[name].eval_split]).exists()]
        self.missing = [name for name in MCQ_BENCHMARKS if name not in self.against]

    def match(self, item: MCQItem) -> str | None:
        """"benchmark/id" of the reported question `item` repeats; None for a clean question."""
        return reported_copy(item, self.data_dir)


def contamination(settings: Settings) -> Contamination:
    """The rule for `settings.data_dir` (the reported questions are read once per process: `reported_questions`)."""
    return Contamination(settings.data_dir)


def decontaminate(items: list[Any], check: Contamination) -> tuple[list[Any], dict[str, str]]:
    """The items no reported split holds, in order, and id -> what each one left out matched."""
    left_out = {item.id: hit for item in items if (hit := check.match(item))}
    return [item for item in items if item.id not in left_out], left_out


def load_items(settings: Settings, benchmarks: list[str],
               limit: int | None) -> tuple[dict[str, tuple[str, list[Any]]], dict[str, dict[str, str]]]:
    """Each benchmark's calibration questions (the first `limit`), without those a reported split holds; and per
    benchmark, the ones left out (id -> what it matched)."""
    for name in benchmarks:
        if name not in CALIBRATION_SPLITS:
            raise CalibrationError(f"unknown MCQ benchmark {name!r}; known: {', '.join(CALIBRATION_SPLITS)}")
    check = contamination(settings)
    data, left_out = {}, {}
    for name in benchmarks:
        split = CALIBRATION_SPLITS[name]
        cap = OPENBOOKQA_TRAIN_QUESTIONS if name == "openbookqa" else None
        cap = min(x for x in (cap, limit) if x is not None) if (cap or limit) else None
        items, left_out[name] = decontaminate(load(name, split=split, data_dir=settings.data_dir, limit=cap), check)
        data[name] = (split, items)
    return data, left_out


def calibration_questions(settings: Settings, name: str, split: str) -> dict[str, MCQItem]:
    """The questions of a calibration split under `settings.data_dir`, by id (for saved scores, which keep ids)."""
    try:
        return {item.id: item for item in load(name, split=split, data_dir=settings.data_dir,
                                               limit=CALIBRATION_LIMITS.get(name))}
    except DatasetError as exc:
        raise CalibrationError(f"a refit needs the questions the scores were made on: {exc}") from None


def decontaminate_scores(settings: Settings, saved: SavedScores) -> tuple[SavedScores, dict[str, dict[str, str]]]:
    """Saved scores without the questions a reported split holds, by the rule a fresh run applies: read by id
    against the calibration split under `settings.data_dir` (so that files scored before the rule existed stay
    usable), and per benchmark those left out now. A question the folder's split lacks, or one saved without its
    id, cannot be checked: refused."""
    check = contamination(settings)
    scored, left_out = {}, {}
    for name, items in saved.scored.items():
        split = saved.splits[name]
        by_id = calibration_questions(settings, name, split)
        unknown = [s.id for s in items if s.id not in by_id]
        if unknown:
            raise CalibrationError(
                f"--scores holds {len(unknown)} {name} question(s) that {name}'s {split} split under "
                f"{settings.data_dir} lacks ({', '.join(repr(i) for i in unknown[:3])}): they cannot be checked "
                "against the reported splits; point ZEPHYR_DATA_DIR at the data they were scored on, or score "
                "them again")
        left_out[name] = {s.id: hit for s in items if (hit := check.match(by_id[s.id]))}
        scored[name] = [s for s in items if s.id not in left_out[name]]
    return saved._replace(scored=scored), left_out


def left_out_note(check: Contamination, left_out: dict[str, dict[str, str]], before: dict[str, int] | None = None,
                  what: str = "calibration questions") -> str:
    """One line for the console: how many questions were left out per benchmark (and, for a refit, how many the
    scoring run had left out already), a few examples, and the reported splits the data folder lacks."""
    before = before or {}
    counts = ", ".join(f"{name} {len(ids) + before.get(name, 0)}" for name, ids in left_out.items())
    examples = [f"{name}/{i} = {hit}" for name, ids in left_out.items() for i, hit in ids.items()][:3]
    note = f"left out {what} a reported split holds: {counts}"
    if any(before.values()):
        note += f" ({', '.join(f'{n} {c}' for n, c in before.items() if c)} of them when scored)"
    if examples:
        note += f"; e.g. {'; '.join(examples)}"
    if check.missing:
        note += f" [not checked against {', '.join(check.missing)}: no reported split in the data folder]"
    return note


def check_demonstrations(settings: Settings, saved: SavedScores) -> None:
    """Refuses saved scores made after a demonstration that a reported split holds (files scored before the draw
    was checked, or while a reported split was missing from the data folder): the record would ship it."""
    source = saved.demonstrations_source
    if not saved.demonstrations or not source.get("ids"):
        return
    check = contamination(settings)
    try:
        by_id = {item.id: item for item in load(source["benchmark"], split=source["split"],
                                                 data_dir=settings.data_dir)}
    except DatasetError as exc:
        raise CalibrationError(f"the saved scores' demonstrations cannot be checked against the reported splits: "
                               f"{exc}") from None
    if missing := [i for i in source["ids"] if i not in by_id]:
        raise CalibrationError(f"the saved scores' demonstrations {missing} are not in {source['benchmark']}'s "
                               f"{source['split']} split under {settings.data_dir}: they cannot be checked against "
                               "the reported splits; score again")
    if copies := {i: hit for i in source["ids"] if (hit := check.match(by_id[i]))}:
        raise CalibrationError("the saved scores were made after demonstrations a reported split holds ("
                               + ", ".join(f"{i} = {hit}" for i, hit in copies.items())
                               + "): score again, which draws clean ones")


def head_checked(settings: Settings, head: dict[str, Any]) -> bool:
    """Whether a saved question-domain head's training questions were cleaned against every reported split the
    data folder now has (heads from before the check was recorded: unknown, so no)."""
    checked = head.get("fitted", {}).get("checked_against")
    return checked is not None and set(contamination(settings).against) <= set(checked)


def question_domain_head(settings: Settings, encoder: Any, console: Console,
                         limit: int | None = None) -> mcq.QuestionDomain:
    """The question-domain head fitted on QUESTION_DOMAIN_TRAINING (the first `limit` questions of each, for a
    limited run), without the questions a reported split holds."""
    from zephyr.encoder import embed

    check = contamination(settings)
    # which reported splits its questions were cleaned against: a refit under a fuller data folder fits it again
    questions, fitted = {}, {"splits": {}, "n": {}, "decontaminated": {}, "checked_against": check.against}
    for name, (split, skip) in QUESTION_DOMAIN_TRAINING.items():  # every split read before any is embedded
        loaded = load(name, split=split, data_dir=settings.data_dir)
        # Past the head calibration reads, and without its questions repeated under other ids (OpenBookQA train
        # repeats 8 of its first 500, with the same options), as items_outside_calibration leaves them out.
        past = without_questions_of(loaded[skip:], loaded[:skip])
        items, left_out = decontaminate(first(past, limit), check)
        if not items:
            raise DatasetError(f"{name}'s {split} split holds no questions {f'past the first {skip} ' if skip else ''}"
                               "to learn its domain from")
        questions[name] = items
        fitted["splits"][name] = f"{split}[{skip}:]" if skip else split
        fitted["n"][name], fitted["decontaminated"][name] = len(items), len(left_out)
    console.print("question domain: learning which set a question reads like from "
                  + ", ".join(f"{len(items)} {name} {fitted['splits'][name]}" for name, items in questions.items()))
    embeddings = {name: embed(encoder, [mcq.domain_text(mcq_eval.question_of(i)) for i in items],
                              progress=len(items) > 200) for name, items in questions.items()}
    return calibration.fit_question_domain(embeddings, fitted)


def with_question_domains(settings: Settings, saved: SavedScores, console: Console,
                          questions: dict[str, list[MCQItem]] | None = None,
                          limit: int | None = None) -> SavedScores:
    """Every question's domain (mcq.QuestionDomain's probabilities), by the head the scores carry or one fitted
    now; the questions' texts from `questions` or, for saved scores, the calibration splits by id."""
    from zephyr.encoder import load_encoder

    encoder = load_encoder()
    head = (mcq.QuestionDomain.model_validate(saved.question_domain) if saved.question_domain
            else question_domain_head(settings, encoder, console, limit))
    scored = {}
    for name, items in saved.scored.items():
        texts = {i.id: i for i in questions[name]} if questions else calibration_questions(settings, name,
                                                                                         saved.splits[name])
        domains = mcq_eval.question_domains([texts[s.id] for s in items], head, encoder)
        scored[name] = [dataclasses.replace(s, scores=dataclasses.replace(s.scores, domain=domains[s.id]))
                        for s in items]
    return saved._replace(scored=scored, question_domain=head.model_dump(mode="json"))


def without_question_domains(saved: SavedScores) -> SavedScores:
    return saved._replace(question_domain=None, scored={name: [
        dataclasses.replace(s, scores=dataclasses.replace(s.scores, domain=None)) for s in items]
        for name, items in saved.scored.items()})


def demonstrations(settings: Settings, count: int, seed: int = DEMONSTRATIONS_SEED) -> tuple[str, dict[str, Any]]:
    """`count` solved examples rendered as cloze scores them (mcq.render_demonstrations), and where they came from
    (benchmark, split, seed and item ids, for the record); no text for a count of 0."""
    if not 0 <= count <= DEMONSTRATIONS_MAX:
        raise CalibrationError(f"the number of demonstrations must be 0 to {DEMONSTRATIONS_MAX}, got {count}")
    if count == 0:
        return "", {}
    name, split = DEMONSTRATIONS_FROM
    pool = [item for item in load(name, split=split, data_dir=settings.data_dir)
            if len(item.question) < DEMONSTRATION_MAX_QUESTION_CHARS and len(item.options) == 4]
    chosen, skipped = draw_clean(pool, count, seed, contamination(settings).match)
    text = mcq.render_demonstrations([(mcq_eval.question_of(item), item.options[mcq.LETTERS.index(item.answer)])
                                      for item in chosen])
    source = {"benchmark": name, "split": split, "seed": seed, "count": count, "ids": [i.id for i in chosen]}
    if skipped:  # only then: a draw that skipped nothing is recorded as before
        source["skipped"] = skipped
    return text, source


def draw_clean(pool: list[Any], count: int, seed: int, match: Any) -> tuple[list[Any], list[str]]:
    """`count` items of `pool` drawn by `seed`, none that `match` flags, and the ids of those skipped. The draw is
    `random.Random(seed).sample(pool, k)` with k = count first: when that holds no flagged item it is the answer,
    exactly the draw made before items were checked. Otherwise k grows by the shortfall and the same seed draws
    again, the clean items taken in drawn order, until `count` are clean (deterministic for a pool and seed)."""
    k = count
    while True:
        drawn = random.Random(seed).sample(pool, min(k, len(pool)))
        kept: list[Any] = []
        skipped: list[str] = []
        for item in drawn:
            if len(kept) == count:
                break
            if match(item):
                skipped.append(item.id)
            else:
                kept.append(item)
        if len(kept) == count:
            return kept, skipped
        if k >= len(pool):
            raise CalibrationError(f"only {len(kept)} of the {len(pool)} demonstration candidates are clean of the "
                                   f"reported splits; {count} were asked for")
        k += count - len(kept)


def default_demonstrations(registry: Registry, entry: RegistryEntry) -> tuple[int, str]:
    """How many demonstrations a calibration scores after when none are asked for, and why. A quantized entry is
    asked as its parent's record asks (the count was chosen on validation for those weights, and the
    quantized-vs-parent comparison then differs in the weights alone); anything else gets the default."""
    parent = entry.manifest.parent
    if entry.manifest.method in QUANT_METHODS and parent and registry.exists(parent):
        record = registry.get(parent).manifest.mcq_calibration
        if record is not None:
            count = record.demonstrations_source.get("count", 0) if record.demonstrations else 0
            return count, f"as its parent {parent}'s record asks"
    return DEMONSTRATIONS_DEFAULT, "the default"


class SavedScores(NamedTuple):
    """A scores file of `zephyr eval calibrate`: the splits, the per-question scores, and what the cloze and answer
    prior were scored after (a refit records the same in the model's record)."""

    splits: dict[str, str]
    scored: dict[str, list[calibration.Scored]]
    answer_prior_context: str
    demonstrations: str = ""
    demonstrations_source: dict[str, Any] = {}
    dtype: str | None = None  # what the engine computed in; None in files from before it was saved
    # per benchmark, the questions a reported split holds that the scoring run left out (0 in files from before)
    decontaminated: dict[str, int] = {}
    # the head that computed every question's `domain` (mcq.QuestionDomain as a dict); None in files without them
    question_domain: dict[str, Any] | None = None
    # which weights of the model's name were scored (ModelManifest.revision); None in files from before 2026-12-06
    model_revision: str | None = None


def score_validation(entry: Any, settings: Settings, data: dict[str, tuple[str, list[Any]]],
                     console: Console, answer_prior_context: str,
                     letter: bool = True, demonstrations: str = "") -> dict[str, list[calibration.Scored]]:
    """Every validation question's letter (unless `letter` is False), answer-prior (after `answer_prior_context`)
    and cloze scores, from one engine; cloze and answer prior after `demonstrations`."""
    if needs_transformers(entry):
        from evals.hf_letter import TransformersEngine

        engine: Any = TransformersEngine(entry.path)
    else:
        from evals.engine import EvalEngine

        console.print(f"starting vLLM on {entry.path} ...")
        engine = EvalEngine(entry.path, settings)
    try:
        letters = ({name: engine.letter(name, split, items) for name, (split, items) in data.items()} if letter
                   else {})
        # The transformers engine (bitsandbytes on CPU) has no answer-prior scorer: its fit skips cloze_pmi.
        priors = ({name: engine.answer_prior(name, split, items, context=answer_prior_context,
                                             demonstrations=demonstrations)
                   for name, (split, items) in data.items()}
                  if hasattr(engine, "answer_prior") else {})
        with tempfile.TemporaryDirectory(prefix="zephyr-calibrate-") as workdir:
            cloze = {m.benchmark: m for m in mcq_eval.cloze(engine.lm_eval_model, data, Path(workdir), demonstrations)
                     if m.metric == "cloze_acc"}
    finally:
        engine.shutdown()
    scored: dict[str, list[calibration.Scored]] = {}
    for name, (_, items) in data.items():
        scores = mcq_eval.option_scores(items, letters.get(name), cloze[name], priors.get(name))
        scored[name] = [calibration.Scored(scores[i.id], mcq.LETTERS.index(i.answer), i.id) for i in items]
    return scored


def save_scores(path: Path, splits: dict[str, str], scored: dict[str, list[calibration.Scored]],
                answer_prior_context: str, demonstrations: str = "",
                demonstrations_source: dict[str, Any] | None = None, dtype: str | None = None,
                decontaminated: dict[str, int] | None = None, question_domain: dict[str, Any] | None = None,
                model_revision: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scored_after = {"answer_prior_context": answer_prior_context, "demonstrations": demonstrations,
                    "demonstrations_source": demonstrations_source or {}, "dtype": dtype,
                    **({"question_domain": question_domain} if question_domain else {}),
                    **({"model_revision": model_revision} if model_revision else {})}
    # atomic: the file is rewritten in place (question domains added), and it holds an hour of scoring
    write_text_atomic(path, json.dumps({name: {"split": splits[name], **scored_after,
                                       "decontaminated": (decontaminated or {}).get(name, 0), "items": [
        {"id": s.id, "gold": s.gold, **{k: v for k, v in vars(s.scores).items() if v is not None}} for s in items]}
        for name, items in scored.items()}))
    return path


def load_scores(path: Path) -> SavedScores:
    """The splits, the scores, the cue the answer priors were scored after and the demonstrations before every
    prompt (files from before the cue was saved used the legacy one; from before demonstrations, none), and how
    many questions of each benchmark the scoring run left out (none in files from before it did)."""
    try:
        raw = json.loads(Path(path).read_text())
        splits = {name: block["split"] for name, block in raw.items()}
        fields = {f.name for f in dataclasses.fields(mcq.OptionScores)}
        scored = {name: [calibration.Scored(mcq.OptionScores(**{k: v for k, v in item.items() if k in fields}),
                                            item["gold"], item.get("id", "")) for item in block["items"]]
                  for name, block in raw.items()}
        cues = {block.get("answer_prior_context", mcq.LEGACY_ANSWER_PRIOR_CONTEXT) for block in raw.values()}
        shown = {json.dumps([block.get("demonstrations", ""), block.get("demonstrations_source", {})])
                 for block in raw.values()}
        dtypes = {block.get("dtype") for block in raw.values()}
        decontaminated = {name: int(block.get("decontaminated", 0)) for name, block in raw.items()}
        heads = {json.dumps(block.get("question_domain"), sort_keys=True) for block in raw.values()}
        revisions = {block.get("model_revision") for block in raw.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CalibrationError(f"{path} is not a scores file written by `zephyr eval calibrate` ({exc})") from exc
    for name, items in scored.items():  # a hand-edited or foreign file: a traceback in the fit, not this message
        for item in items:
            lengths = {len(v) for k, v in vars(item.scores).items() if isinstance(v, list | tuple) and k != "domain"}
            if len(lengths) != 1 or isinstance(item.gold, bool) or not isinstance(item.gold, int) \
                    or not 0 <= item.gold < lengths.pop():
                raise CalibrationError(f"{path}: {name} item {item.id!r} has gold {item.gold!r} or scores of unlike "
                                       "lengths for its options; score again without --scores")
    if len(cues) > 1:
        raise CalibrationError(f"{path} mixes answer priors scored after different cues ({sorted(cues)}); "
                               "score them again with one `zephyr eval calibrate` run")
    if len(shown) > 1:
        raise CalibrationError(f"{path} mixes questions scored after different demonstrations; score them again "
                               "with one `zephyr eval calibrate` run")
    if len(dtypes) > 1:  # a record claims one dtype, or (for files from before it was saved) none
        raise CalibrationError(f"{path} mixes scores computed in different dtypes ({sorted(map(str, dtypes))}); "
                               "score them again with one `zephyr eval calibrate` run")
    if len(heads) > 1:
        raise CalibrationError(f"{path} mixes question domains computed by different heads; refit without them "
                               "(--no-question-domain) or score them again with one `zephyr eval calibrate` run")
    if len(revisions) > 1:
        raise CalibrationError(f"{path} mixes scores of different weights ({sorted(map(str, revisions))}); score "
                               "them again with one `zephyr eval calibrate` run")
    head = json.loads(heads.pop()) if heads else None
    if head is not None:
        try:
            mcq.QuestionDomain.model_validate(head)
        except ValidationError as exc:
            raise CalibrationError(f"{path} holds a question_domain head that cannot be used: "
                                   f"{exc.errors()[0]['msg']}") from None
    text, source = json.loads(shown.pop()) if shown else ("", {})
    return SavedScores(splits, scored, cues.pop() if cues else mcq.ANSWER_PRIOR_CONTEXT, text, source,
                       dtypes.pop() if dtypes else None, decontaminated, head, revisions.pop() if revisions else None)


def calibrate(model: str, settings: Settings, console: Console, limit: int | None = None,
              benchmarks: list[str] | None = None, write: bool = True,
              scores: Path | None = None, letter: bool = True,
              answer_prior_context: str | None = None,
              demonstration_count: int | None = None, question_domain: bool = True) -> mcq.MCQCalibration:
    """Scores the validation questions (or reads the scores an earlier run saved), fits, shows both tables and
    writes the record into the model's zephyr.json. Without `letter` the letter format is not scored and the
    candidates that read it are not fitted (the fit skips a feature no question has). Cloze and the answer prior
    are scored after `demonstration_count` solved training examples, which the record keeps for the service
    (None: as many as `default_demonstrations` says). With `question_domain` the sharpness may also read which set
    each question reads like (`with_question_domains`; a refit of scores saved without it computes it and saves the
    scores again)."""
    registry = Registry(settings.models_dir)
    entry = registry.get(model)
    if scores is not None:
        own = ResultStore(settings.resolved_eval_results_dir).folder(model).resolve()
        if not Path(scores).resolve().is_relative_to(own):
            raise CalibrationError(f"--scores {scores} is not one of {model}'s saved scores (under {own}): a record "
                                   "must be fitted on the scores of the model it is written into")
        saved_scores = load_scores(scores)
        scored_weights, serving = saved_scores.model_revision, entry.manifest.revision
        if scored_weights is not None and scored_weights != serving:
            # The results folder outlives `train`/`quantize --overwrite`: the file may hold an earlier entry's scores.
            raise CalibrationError(f"--scores {scores} scored other weights of {model} ({scored_weights}) than the "
                                   f"entry holds now ({serving}: made again since); score them again without "
                                   "--scores")
        if scored_weights is None:
            console.print(f"[yellow]--scores {scores} does not say which weights it scored (a file from before "
                          f"2026-12-06): it is taken to be {model}'s as the entry holds them now[/]")
        wrong = {name: split for name, split in saved_scores.splits.items() if CALIBRATION_SPLITS.get(name) != split}
        if wrong:  # fitted on validation only, as every record is
            raise CalibrationError("--scores holds splits calibration never reads: " + ", ".join(
                f"{name}:{split} (calibration reads {CALIBRATION_SPLITS.get(name, 'nothing of it')})"
                for name, split in wrong.items()))
        console.print(f"refitting from {scores}")
        before = saved_scores.decontaminated
        saved_scores, left_out = decontaminate_scores(settings, saved_scores)
        # the scores' questions that a reported split holds: those the scoring run left out, and those left out now
        # (a file from before the rule, or a rule that found more)
        decontaminated = {name: before.get(name, 0) + len(ids) for name, ids in left_out.items()}
        console.print(left_out_note(contamination(settings), left_out, before))
        check_demonstrations(settings, saved_scores)
        if saved_scores.question_domain is not None and not head_checked(settings, saved_scores.question_domain):
            console.print("question domain: the saved head's training questions were not checked against every "
                          "reported split this data folder has; fitting it again")
            saved_scores = without_question_domains(saved_scores)
        if question_domain and saved_scores.question_domain is None and _reads_cloze(saved_scores):
            saved_scores = saved_scores._replace(decontaminated=decontaminated)  # what its items now leave out
            if (saved_scores := _domains_or_none(settings, saved_scores, console)).question_domain is not None:
                resaved = save_scores(Path(scores).with_name(f"scores-{_stamp()}.json"), *saved_scores)
                console.print(f"validation scores with question domains -> {resaved} (refit with --scores)")
    else:
        cue = answer_prior_context or mcq.ANSWER_PRIOR_CONTEXT
        if demonstration_count is None:
            demonstration_count, why = default_demonstrations(registry, entry)
            console.print(f"{demonstration_count} demonstrations: {why} (--demonstrations to choose)")
        shown, source = demonstrations(settings, demonstration_count)
        if source.get("skipped"):
            console.print(f"demonstrations: skipped {len(source['skipped'])} drawn that a reported split holds "
                          f"({', '.join(source['skipped'])})")
        data, left_out = load_items(settings, benchmarks or list(CALIBRATION_SPLITS), limit)
        decontaminated = {name: len(ids) for name, ids in left_out.items()}
        console.print(left_out_note(contamination(settings), left_out))
        saved_scores = SavedScores({name: split for name, (split, _) in data.items()},
                                   score_validation(entry, settings, data, console, cue, letter=letter,
                                                    demonstrations=shown), cue, shown, source,
                                   None if needs_transformers(entry) else served_dtype(entry.path, settings.dtype),
                                   decontaminated, model_revision=entry.manifest.revision)
        folder = ResultStore(settings.resolved_eval_results_dir).folder(model)
        # saved before the domains are added: the engine's scoring is the costly part, and kept whatever follows
        saved = save_scores(folder / "calibration" / f"scores-{_stamp()}.json", *saved_scores)
        console.print(f"validation scores -> {saved} (refit with --scores)")
        if question_domain and _reads_cloze(saved_scores):
            saved_scores = _domains_or_none(settings, saved_scores, console,
                                            {name: items for name, (_, items) in data.items()}, limit)
            if saved_scores.question_domain is not None:
                save_scores(saved, *saved_scores)
                console.print(f"validation scores with question domains -> {saved}")
    if not question_domain:
        saved_scores = without_question_domains(saved_scores)
    splits, scored, cue = saved_scores.splits, saved_scores.scored, saved_scores.answer_prior_context
    if impossible := {name: bad for name, items in scored.items() if (bad := calibration.non_finite(items))}:
        console.print("[yellow]left out questions with a score that is not finite[/]: " + "; ".join(
            f"{name} {', '.join(i.id or '?' for i in bad)}" for name, bad in impossible.items()))
        dropped = {id(i) for bad in impossible.values() for i in bad}  # by identity: NaN != NaN
        scored = {name: [i for i in items if id(i) not in dropped] for name, items in scored.items()}
    if emptied := sorted(name for name, items in scored.items() if not items):
        console.print(f"[yellow]no question of {', '.join(emptied)} is left to calibrate on[/]")
        scored = {name: items for name, items in scored.items() if items}
    pooled = [s for items in scored.values() for s in items]
    if not pooled:
        raise CalibrationError("no validation question is left to calibrate on (each was left out as a reported "
                               "split repeats it, or its score is not finite); name more --benchmarks or a "
                               "larger --limit")
    record, figures = calibration.fit(pooled)
    try:  # validated, not copied: the record is read back at every server start
        record = mcq.MCQCalibration.model_validate(record.model_dump() | {
            "answer_prior_context": cue, "demonstrations": saved_scores.demonstrations,
            "demonstrations_source": saved_scores.demonstrations_source, "dtype": saved_scores.dtype,
            # the head only where the sharpness reads it: the service then embeds every question
            "question_domain": saved_scores.question_domain if record.reads_question_domain else None})
    except ValidationError as exc:
        raise CalibrationError(f"the answer cue or the demonstrations cannot be recorded: "
                               f"{exc.errors()[0]['msg']}") from None
    per_benchmark = {name: calibration.evaluate(record, items) for name, items in scored.items()}
    unseen = calibration.left_out_sets(scored, record.method)
    record.validation.update({
        "splits": {name: {"split": splits[name], "n": len(items)} for name, items in scored.items()},
        # per benchmark, the calibration questions left out as a reported split holds them (absent in older records)
        "decontaminated": {name: decontaminated.get(name, 0) for name in scored},
        "benchmarks": {name: {k: f[k] for k in ("n", "accuracy", "ece", "brier", "nll")}
                       for name, f in per_benchmark.items()},
        # per benchmark, the method fitted on the other sets alone: what to expect on a set no fit has seen
        "left_out_set": {name: {k: f[k] for k in ("n", "accuracy", "confidence", "ece", "brier", "nll")}
                         for name, f in unseen.items()},
    })
    console.print(candidates_table(model, record, figures))
    console.print(benchmarks_table(record, per_benchmark, unseen))
    if write:
        registry.record_calibration(model, record, made_at=entry.manifest.created_at)
        weights = ", ".join(f"{k} {v:.3f}" for k, v in record.weights.items())
        cue_note = f"; answer cue {record.answer_prior_context!r}" if record.weights.get("answer_prior") else ""
        cue_note += (f"; {record.demonstrations_source.get('count', 0)} demonstrations"
                     if record.demonstrations else "")
        console.print(f"auto for {model}: [bold]{record.method}[/] (weights {weights}{cue_note}) -> "
                      f"{entry.path / 'zephyr.json'}")
    return record


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _reads_cloze(saved: SavedScores) -> bool:
    """Whether the sharpness, and so the question domain, can be fitted: it scales cloze scores."""
    return all(s.scores.cloze is not None for items in saved.scored.values() for s in items)


def _domains_or_none(settings: Settings, saved: SavedScores, console: Console,
                     questions: dict[str, list[MCQItem]] | None = None, limit: int | None = None) -> SavedScores:
    """The scores with question domains; as they were, with a warning, where the data folder lacks a training
    split the head learns from."""
    from zephyr.encoder import EncoderError

    try:
        return with_question_domains(settings, saved, console, questions, limit)
    except (DatasetError, EncoderError) as exc:
        console.print(f"[yellow]question domain not fitted[/] ({exc}); calibrating without it "
                      "(--no-question-domain says so)")
        return saved


def candidates_table(model: str, record: mcq.MCQCalibration, figures: dict[str, dict[str, Any]]) -> Table:
    held_out = any(f["cross_validated"] for f in figures.values())
    table = Table(title=f"{model}: /mcq methods on {record.validation['n']} validation questions: uncalibrated -> "
                        + ("calibrated on the other folds" if held_out else "calibrated in sample"),
                  caption=f"chosen by {record.validation['chosen_by']}; "
                  "NLL and ECE (15 bins) show calibration; weights fitted on all the questions")
    for column in ("method", "accuracy", "NLL", "ECE", "weights"):
        table.add_column(column, justify="left" if column in ("method", "weights") else "right")
    for name, f in figures.items():
        raw, held = f["raw"], f["cross_validated"] or f["fitted"]
        table.add_row(Text(name + (" (chosen)" if name == record.method else ""),
                           style="bold" if name == record.method else ""),
                      Text(f"{raw['accuracy']:.1%} -> {held['accuracy']:.1%}"),
                      Text(f"{raw['nll']:.3f} -> {held['nll']:.3f}"),
                      Text(f"{raw['ece']:.3f} -> {held['ece']:.3f}"),
                      Text(", ".join(f"{k} {v:.3f}" for k, v in f["weights"].items())))
    return table


def benchmarks_table(record: mcq.MCQCalibration, per_benchmark: dict[str, dict[str, Any]],
                     left_out: dict[str, dict[str, Any]] | None = None) -> Table:
    left_out = left_out or {}
    table = Table(title=f"auto ({record.method}) on each validation set, in sample (the record was fitted on them)",
                  caption="set left out: fitted on the other sets alone, what to expect on a set no fit has seen"
                  if left_out else None)
    columns = ["benchmark", "split", "n", "accuracy", "ECE", "Brier", "acc @80%", "acc @50%"]
    if left_out:
        columns += ["confidence / ECE, set left out"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("benchmark", "split") else "right")
    for name, f in per_benchmark.items():
        coverage = f["coverage_accuracy"]
        cells = [name, CALIBRATION_SPLITS.get(name, "?"), str(f["n"]), f"{f['accuracy']:.1%}", f"{f['ece']:.3f}",
                 f"{f['brier']:.3f}", f"{coverage['80%']:.1%}", f"{coverage['50%']:.1%}"]
        if left_out:
            held = left_out.get(name)
            cells.append(f"{held['confidence']:.2f} / {held['ece']:.3f}" if held else "-")
        table.add_row(*cells)
    return table
