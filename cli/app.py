"""The `zephyr` command line. Errors end in one line that says what to do, and exit code 1."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from cli.common import DATABASE_ERRORS, console, database_failure, err, fail, load_settings, os_failure, registry
from cli.evaluate import app as eval_app
from cli.quantize import quantize_command
from cli.train import data_app, train_app
from zephyr.paths import write_text_atomic
from zephyr.registry import METHODS, ModelManifest, Registry, RegistryError
from zephyr.settings import DEFAULT_MODEL

app = typer.Typer(help="Zephyr, the science tutor: serve it, manage its models, talk to it.", no_args_is_help=True)
models_app = typer.Typer(help="Manage the model registry ($ZEPHYR_HOME/models).", no_args_is_help=True)
app.add_typer(models_app, name="models")
review_app = typer.Typer(help="Human review: statistics and export of verdicts as training data.",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")
log_app = typer.Typer(help="The generation log: how long students' conversations are kept.", no_args_is_help=True)
app.add_typer(log_app, name="log")
app.add_typer(eval_app, name="eval")
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")
app.command("quantize")(quantize_command)


class LogLevel(enum.StrEnum):
    """uvicorn's levels; `trace` logs ours at debug (logging has no trace level)."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


ServerURL = Annotated[str, typer.Option("--url", envvar="ZEPHYR_URL", help="Base URL of a running Zephyr server")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="ZEPHYR_API_KEY", help="Bearer key for the server")]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind \\[env ZEPHYR_HOST, default 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Port \\[env ZEPHYR_PORT, default 8000]")] = None,
    model: Annotated[str | None, typer.Option(help="Registry model \\[env ZEPHYR_MODEL]")] = None,
    log_level: Annotated[LogLevel, typer.Option(help="uvicorn log level", case_sensitive=False)] = LogLevel.info,
) -> None:
    """Serve the tutor: OpenAI-compatible chat, /mcq, metrics and the generation log."""
    from service.app import UnsafeBind, check_bind, create_app, run_server
    from service.engine import VLLMEngine
    from zephyr.bundled import shipped_calibration
    from zephyr.encoder import EncoderError, minilm_folder
    from zephyr.safety import SafetyError, load_record

    settings = load_settings(host=host, port=port, model=model)
    try:
        check_bind(settings)  # also parses the API keys, failing here on a malformed entry
        models = Registry(settings.models_dir)
        if settings.model != DEFAULT_MODEL or models.exists(settings.model):
            entry = models.get(settings.model)
            if problem := VLLMEngine.refusal(settings, entry.path, entry.name):
                raise fail(problem)
            record = entry.manifest.mcq_calibration
        else:  # built at start, with the shipped record
            record = shipped_calibration()
        reads_domain = record is not None and record.reads_question_domain
        if settings.safety_guard:  # before the engine's minute of start-up, not after it
            load_record(settings.safety_record)
        if settings.safety_guard or reads_domain:  # the guard's encoder, or the one /mcq's record reads with
            minilm_folder()
        # a guidelines file that is not there, a home that is a file, a keys file the account cannot read
        app = create_app(settings)
    except (UnsafeBind, RegistryError, SafetyError, EncoderError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(run_server(app, settings, log_level.value))


@models_app.command("list")
def models_list() -> None:
    """List the registry's models."""
    entries = registry().list()
    if not entries:
        console.print("no models yet; `zephyr models prepare` makes the default one")
        return
    table = Table("name", "method", "parent", "created", "size", "evals")
    for e in entries:
        m = e.manifest
        table.add_row(m.name, m.method, m.parent or "-", f"{m.created_at:%Y-%m-%d %H:%M}",
                      f"{e.size_bytes() / 1e6:.0f} MB", ", ".join(m.evals) or "-")
    console.print(table)


@models_app.command("show")
def models_show(name: str) -> None:
    """Print one model's manifest as JSON."""
    try:
        entry = registry().get(name)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    console.print_json(json.dumps({"path": str(entry.path), **entry.manifest.model_dump(mode="json")}))


@models_app.command("prepare")
def models_prepare() -> None:
    """Make the default model from the bundled checkpoint if the registry lacks it; give it the shipped /mcq
    calibration record if it has none; and check that the model `zephyr serve` would serve (ZEPHYR_MODEL) is there,
    so a container that prepares before it serves (the chart's init container) says what is missing."""
    from zephyr.bundled import prepare_default_model

    models = registry()
    try:
        models.models_dir.mkdir(parents=True, exist_ok=True)  # before minutes of converting and a smoke test
        entry = prepare_default_model(models, err)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # ZEPHYR_HOME under a file, a volume mounted read-only: the init container's log says so
        raise os_failure(f"prepare the registry at {models.models_dir}", exc) from None
    console.print(f"{entry.name}: {entry.path}")
    served = load_settings().model
    try:
        there = models.exists(served)
    except RegistryError as exc:
        raise fail(f"ZEPHYR_MODEL: {exc}") from None
    if not there:
        raise fail(f"ZEPHYR_MODEL={served} is not in the registry at {models.models_dir}, so `zephyr serve` could not "
                   f"start: put it there first, with `zephyr models import FOLDER --name {served}` on this volume "
                   "(docs/operations.md, \"Serving another model\")")


@models_app.command("import")
def models_import(
    path: Annotated[Path, typer.Argument(help="A local Hugging Face model folder")],
    name: Annotated[str, typer.Option(help="Registry name (lowercase, digits, . _ -)")],
    parent: Annotated[str | None, typer.Option(help="Registry model it derives from")] = None,
    method: Annotated[str, typer.Option(help="How it was made (sft, dpo, gptq, ...)")] = "imported",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an entry of that name (not one other "
                                            "entries were made from)")] = False,
) -> None:
    """Copy a local Hugging Face folder into the registry."""
    try:
        entry = registry().add(path.expanduser(), ModelManifest(name=name, parent=parent, method=method,
                                                               source=str(path.expanduser().resolve())),
                               overwrite=overwrite)
    except ValidationError as exc:  # pydantic's first line only counts the errors: name the field and the fix
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        hint = f"; one of {', '.join(METHODS)}" if where == "method" else ""
        raise fail(f"--{where}: {first['msg']}{hint}") from None
    except RegistryError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # a registry volume read-only or full part way: the copy is not registered
        raise os_failure(f"import {path} as {name}", exc) from None
    console.print(f"imported {entry.name} ({entry.size_bytes() / 1e6:.0f} MB) at {entry.path}")


@models_app.command("remove")
def models_remove(name: str, yes: Annotated[bool, typer.Option("--yes", help="Do not ask")] = False) -> None:
    """Delete a model from the registry."""
    if not yes and not typer.confirm(f"remove {name}?"):
        raise typer.Exit(1)
    try:
        registry().remove(name)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise os_failure(f"remove {name}", exc) from None
    console.print(f"removed {name}")


def _client(url: str, api_key: str | None):
    import openai

    return openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key or "none", max_retries=0)


@app.command()
def chat(
    url: ServerURL = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
    temperature: Annotated[float | None, typer.Option(
        help="Sampling temperature (default: none sent, so the server's chat defaults apply, "
             "ZEPHYR_CHAT_TEMPERATURE and ZEPHYR_CHAT_TOP_P)")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens")] = 512,
) -> None:
    """Chat with a running server in the terminal (streaming). /new starts a new conversation; Ctrl-C stops an
    answer; Ctrl-D or /quit ends it."""
    import openai

    client = _client(url, api_key)
    try:
        model = client.models.list().data[0].id
    except openai.APIConnectionError:
        raise fail(f"cannot reach {url}: start it with `make serve` or pass --url") from None
    except openai.APIStatusError as exc:
        raise fail(_api_message(exc)) from None
    except (openai.APIError, AttributeError, IndexError, TypeError):  # a 200 that is no model list (a web page)
        raise fail(f"{url} answered, but is no OpenAI-compatible server (no model list at /v1/models)") from None
    history: list[dict[str, str]] = []
    # Without --temperature none is sent: the server then samples with its own chat defaults, chosen on validation.
    sampling = {} if temperature is None else {"temperature": temperature}
    err.print(f"[dim]talking to {url}; /new starts a new conversation, /quit ends[/]")
    while True:
        try:
            question = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            break
        if question.strip() in ("/quit", "/exit"):
            break
        if question.strip() == "/new":
            history.clear()
            err.print("[dim]a new conversation[/]")
            continue
        if not question.strip():
            continue
        history.append({"role": "user", "content": question})
        console.print("[bold green]tutor>[/] ", end="")
        answer: list[str] = []
        stream = None
        # A failed turn ends that turn, not the session: the question is taken back and the conversation goes on.
        try:
            # The server sends its headers with the first event: this call waits through the queue and the prefill.
            stream = client.chat.completions.create(model=model, messages=history, stream=True,
                                                    max_tokens=max_tokens, **sampling)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer.append(chunk.choices[0].delta.content)
                    console.print(chunk.choices[0].delta.content, end="", markup=False, highlight=False)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, waited for or begun; what was shown stays
            if stream is not None:
                stream.close()
            console.print()
            err.print("[dim](stopped)[/]")
            if answer:
                history.append({"role": "assistant", "content": "".join(answer)})
            else:
                history.pop()
            continue
        except openai.APIConnectionError as exc:
            if type(exc.__cause__).__name__ == "ConnectError":  # no connection was made: the server is not there
                raise fail(f"cannot reach {url}: start it with `make serve` or pass --url") from None
            console.print()  # it dropped while the answer was awaited or under way (a restart, a proxy's timeout)
            history.pop()
            err.print(Text("the connection broke off before the answer ended; ask again", style="red"))
            continue
        except openai.APIStatusError as exc:  # a 400 (the conversation outgrew the context), a 429, a 503
            console.print()
            history.pop()
            hint = (" (/new starts a new conversation; a lower --max-tokens leaves the question more room)"
                    if _api_code(exc) == "context_length_exceeded" else "")
            err.print(Text.assemble((_api_message(exc), "red"), hint), highlight=False)  # server text: no markup
            continue
        except openai.APIError as exc:  # an error event inside a stream that had begun (the engine stopped)
            console.print()
            history.pop()
            err.print(Text.assemble((f"the answer broke off: {exc.message}", "red"), "; ask again"), highlight=False)
            continue
        console.print()
        history.append({"role": "assistant", "content": "".join(answer)})


def _api_code(exc) -> str | None:
    try:
        return exc.response.json()["error"]["code"]
    except Exception:
        return None


def _api_message(exc) -> str:
    try:
        return f"{exc.status_code}: {exc.response.json()['error']['message']}"
    except Exception:
        return f"{exc.status_code}: {exc.message}"


@app.command("mcq")
def mcq_command(
    question: Annotated[str, typer.Argument(help="The question")],
    option: Annotated[list[str], typer.Option("--option", "-o", help="An option; repeat 2-10 times, in order")],
    method: Annotated[str, typer.Option(
        help="auto (the model's calibrated choice), letter, cloze or explain (reason first)")] = "auto",
    support: Annotated[str | None, typer.Option(help="A passage the question is about")] = None,
    min_confidence: Annotated[float | None, typer.Option(
        help="Abstain (no answer) below this probability of the best option")] = None,
    explain: Annotated[bool, typer.Option(help="Same as --method explain")] = False,
    url: ServerURL = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer")] = False,
) -> None:
    """Ask one multiple-choice question of a running server."""
    import httpx

    if explain and method not in ("auto", "explain"):  # one of the two was meant; sending explain hid which
        raise fail(f"--explain is --method explain; drop one of --explain and --method {method}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"question": question, "options": option, "method": "explain" if explain else method,
            **({"support": support} if support else {}),
            **({"min_confidence": min_confidence} if min_confidence is not None else {})}
    try:
        response = httpx.post(f"{url.rstrip('/')}/mcq", json=body, headers=headers, timeout=300)
    except httpx.ConnectError:
        raise fail(f"cannot reach {url}: start it with `make serve` or pass --url") from None
    except (httpx.HTTPError, ValueError) as exc:  # a bad address (InvalidURL is a ValueError), a timeout
        raise fail(f"no answer from {url}: {exc or type(exc).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        raise fail(f"{url} is not a Zephyr server: it answered {response.status_code} with "
                   f"{response.text[:200]!r}") from None
    if response.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        raise fail(f"{response.status_code}: {error.get('message', body) if isinstance(error, dict) else body}")
    if as_json:
        console.print_json(json.dumps(body))
        return
    expected = ("abstained", "answer", "option", "probabilities", "confidence", "method", "calibrated")
    if not isinstance(body, dict) or any(key not in body for key in expected):  # a 200 from something else
        raise fail(f"{url} answered 200, but not as Zephyr's /mcq does: {json.dumps(body)[:200]}")
    if body.get("explanation"):
        console.print(body["explanation"], markup=False)
    if body["abstained"]:
        console.print(f"[bold]Not sure[/] (confidence {body['confidence']:.0%} is below the floor)")
    else:
        # the option is the asker's text: "[a, b]" is no markup (it vanished), "[/]" no closing tag (a traceback)
        console.print(Text.assemble((str(body["answer"]), "bold"), ". ", str(body["option"])), highlight=False)
    console.print("  ".join(f"{k}: {v:.2f}" for k, v in body["probabilities"].items())
                  + f"   ({body['method']}{', calibrated' if body['calibrated'] else ''})", style="dim")


def _review_data(since: str | None, judged_since: str | None = None):
    """Verdicts and generations straight from the generation-log database (ZEPHYR_DB_URL)."""
    import asyncio
    from datetime import timedelta

    from service.review import export
    from service.review.store import ReviewPolicy, ReviewStore
    from service.store.log import make_engine

    settings = load_settings()
    try:
        since_at = export.parse_since(since)
        judged_since_at = export.parse_since(judged_since, "--judged-since")
    except ValueError as exc:
        raise fail(str(exc)) from None

    async def load():
        engine = make_engine(settings.resolved_db_url)
        try:
            store = ReviewStore(engine, ReviewPolicy(settings.review_overlap, timedelta(0), timedelta(0)))
            judgements, generations = await store.judgements(since_at, judged_since=judged_since_at)
            return judgements, generations, await store.skipped()
        finally:
            await engine.dispose()

    try:
        return settings, *asyncio.run(load())
    except DATABASE_ERRORS as exc:
        raise database_failure(settings.resolved_db_url, "read reviews", exc) from None


@review_app.command("export")
def review_export(
    format: Annotated[str, typer.Option("--format", help="dpo, kto or sft")],
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="JSON Lines file to write")],
    min_agreement: Annotated[float, typer.Option(help="Least share of reviewers agreeing with the majority")] = 0.0,
    min_reviewers: Annotated[int | None, typer.Option(
        help="Least number of verdicts per item (default ZEPHYR_REVIEW_OVERLAP: complete items only)")] = None,
    include_flagged: Annotated[bool, typer.Option(
        "--include-flagged", help="dpo: keep pairs whose chosen answer a reviewer flagged incorrect or unsafe")]
    = False,
    since: Annotated[str | None, typer.Option(help="Only items created on or after this date (YYYY-MM-DD, UTC); a "
                                              "verdict given later on an older item is not among them")] = None,
    judged_since: Annotated[str | None, typer.Option(
        help="Only items with a verdict given on or after this time (ISO 8601, UTC unless it says), with all their "
             "verdicts: an export after the last one")] = None,
    model: Annotated[str | None, typer.Option(help="Only records whose every answer this registry model wrote "
                                              "(training a model on its own answers)")] = None,
    include_unfinished: Annotated[bool, typer.Option(
        "--include-unfinished", help="Keep answers cut off at max_tokens or by the client's stop strings, and those "
        "the safety guard refused or stopped: every verdict, to count them (`eval gate --reviews`), not as training "
        "text")] = False,
) -> None:
    """Write reviewer verdicts as preference (dpo), unpaired (kto) or supervised (sft) training data."""
    from collections import Counter

    from service.review import export
    from zephyr.pii import Redactor

    if format not in ("dpo", "kto", "sft"):
        raise fail(f"--format must be dpo, kto or sft, not {format!r}")
    if not 0 <= min_agreement <= 1:
        raise fail("--min-agreement is a share between 0 and 1")
    if min_reviewers is not None and min_reviewers < 1:
        raise fail("--min-reviewers must be at least 1")
    settings, judgements, generations, _ = _review_data(since, judged_since)
    min_reviewers = min_reviewers or settings.review_overlap
    redactor = Redactor(settings.pii_entities, settings.student_id_pattern) if settings.pii_redaction else None
    options = export.ExportOptions(format, min_agreement, min_reviewers, include_flagged, model, include_unfinished)
    left_out: Counter[str] = Counter()
    text, count = export.to_jsonl(judgements, generations, options, redactor, left_out)
    try:  # students' conversations, private as the database is; whole, or the earlier file left as it was
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, text, private=True)
    except OSError as exc:
        raise fail(f"--out {out}: {exc.strerror or exc}") from None
    console.print(f"wrote {count} {format} records from {len({j.item_id for j in judgements})} judged items to {out}")
    if left_out["unfinished"]:
        console.print(f"left out {left_out['unfinished']} with an answer the model did not write whole (cut off at "
                      "max_tokens or by the client's stop strings, or the safety guard's reply; --include-unfinished "
                      "keeps them)")
    if left_out["other_model"]:
        console.print(f"left out {left_out['other_model']} with an answer of another model than {model}")
    if left_out["too_few_reviewers"]:
        console.print(f"left out {left_out['too_few_reviewers']} item(s) judged by fewer than {min_reviewers} "
                      "reviewers (ZEPHYR_REVIEW_OVERLAP; --min-reviewers 1 keeps them)")
    if left_out["identical"]:
        console.print(f"left out {left_out['identical']} pair(s) whose two answers are the same text (a preference "
                      "between a text and itself, counted as a tie)")


@log_app.command("prune")
def log_prune(
    older_than_days: Annotated[int, typer.Option("--older-than-days", min=1, max=36_500,
                                                 help="Delete rows older than this many days")],
    include_reviewed: Annotated[bool, typer.Option(
        "--include-reviewed", help="Delete items reviewers judged, skipped or hold too, with their verdicts "
        "(export them first: `zephyr review export`)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before deleting reviewed items")] = False,
) -> None:
    """Delete generation-log rows older than a number of days: served chats and MCQs with their review candidates.
    Items under review stay unless --include-reviewed. The server does this hourly with ZEPHYR_LOG_RETENTION_DAYS."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from service.store import retention
    from service.store.log import make_engine, rejected_file

    settings = load_settings()
    cutoff = datetime.now(UTC) - timedelta(days=older_than_days)
    rejected = rejected_file(settings.resolved_spill_path)
    # Verdicts are the preference data, and nothing gives them back: asked, as `models remove` asks.
    if include_reviewed and not dry_run and not yes and not typer.confirm(
            f"delete every item older than {older_than_days} days with its reviewers' verdicts (export them first: "
            "`zephyr review export`)?"):
        raise typer.Exit(1)

    async def run() -> retention.Pruned:
        engine = make_engine(settings.resolved_db_url)
        try:
            if dry_run:
                return await retention.count_prunable(engine, cutoff, include_reviewed)
            return await retention.prune(engine, cutoff, include_reviewed)
        finally:
            await engine.dispose()

    try:
        with console.status(f"{'counting' if dry_run else 'deleting'} rows before {cutoff:%Y-%m-%d %H:%M} UTC"):
            pruned = asyncio.run(run())
    except DATABASE_ERRORS as exc:
        raise database_failure(settings.resolved_db_url, "prune the log", exc) from None
    try:
        refused = retention.prune_rejected(rejected, cutoff, dry_run)
    except OSError as exc:
        raise fail(f"could not prune {rejected}: {exc}") from None
    table = Table(title=f"{'Would delete' if dry_run else 'Deleted'}: rows before {cutoff:%Y-%m-%d %H:%M} UTC")
    for column in ("served rows", "their candidates", "review assignments", "refused rows in the rejected file"):
        table.add_column(column, justify="right")
    table.add_row(str(pruned.served), str(pruned.children), str(pruned.assignments), str(refused))
    console.print(table)


@review_app.command("stats")
def review_stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON")] = False,
) -> None:
    """Win rates, agreement and reviewer work, as tables (the same figures as GET /review/stats)."""
    from service.review import stats

    settings, judgements, _, skipped = _review_data(None)
    result = stats.compute(judgements, skipped, settings.review_overlap)
    if as_json:
        console.print_json(data=result)
        return
    table = Table(title=f"Win rate by majority vote, over items all {settings.review_overlap} reviewers judged")
    for column in ("model", "items", "wins", "losses", "ties", "both bad", "win rate"):
        table.add_column(column)
    for row in result["win_rate"]:
        table.add_row(row["model"], *(str(row[k]) for k in ("items", "wins", "losses", "ties", "both_bad")),
                      f"{row['win_rate']:.1%}")
    if result["identical_pairs"]:
        table.caption = f"left out: {result['identical_pairs']} pair(s) with one text as both answers"
    console.print(table)
    agreement = result["agreement"]

    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    table = Table(title="Agreement")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("items with 2+ reviewers", str(agreement["items"]))
    table.add_row("raw pairwise agreement", fmt(agreement["raw"]))
    table.add_row("Cohen's kappa, mean over reviewer pairs", fmt(agreement["cohen_mean"]))
    table.add_row(f"Fleiss' kappa ({agreement['fleiss']['items']} items)", fmt(agreement["fleiss"]["kappa"]))
    console.print(table)
    table = Table(title="Reviewers")
    for column in ("reviewer", "judged", "skipped"):
        table.add_column(column)
    for row in result["reviewers"]:
        table.add_row(row["reviewer"], str(row["judged"]), str(row["skipped"]))
    console.print(table)
