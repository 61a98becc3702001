"""The FastAPI application: one engine and one generation log per process, created in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.auth import KeyRing, Limiter, RateLimiter, Sessions, install_secret
from service.engine import Engine, GenParams, VLLMEngine, WatchedEngine
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import BodySizeLimit, LoopbackOnly, RequestMetrics
from service.review import routes as review_routes
from service.review.store import ReviewPolicy, ReviewStore
from service.routes import health, mcq, openai
from service.store import retention
from service.store.log import GenerationLog
from service.tutor import Tutor
from zephyr import __version__, memory
from zephyr.bundled import ensure_default_model
from zephyr.encoder import embed, load_encoder
from zephyr.mcq import QUESTION_DOMAINS, MCQCalibration
from zephyr.numerics import scores_depend_on_batch, served_dtype
from zephyr.pii import Redactor
from zephyr.registry import Registry, RegistryEntry
from zephyr.safety import SafetyGuard, load_record
from zephyr.settings import DEFAULT_MODEL, Settings, is_loopback, unknown_variables

log = logging.getLogger("zephyr.service")
EngineFactory = Callable[[Settings, Path, str], Engine]
WATCHDOG_SECONDS = 1.0
STALL_KILL_SECONDS = 10  # a killed engine's wait to error before the server exits anyway
FINAL_SHUTDOWN_SECONDS = 5


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase. On the first SIGTERM/SIGINT the server stays up but stops being ready and
    answers new generation requests with 503 (so clients retry on another replica instead of meeting a
    refused connection); once nothing is in flight, or after `drain_seconds`, uvicorn's own shutdown runs
    and the process exits 0. A second signal skips the rest of the drain. Stock uvicorn would also re-raise
    the signal after shutdown, so a drained replica would look killed (exit 143) to Kubernetes."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float):
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.drain_deadline: float | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        admission = self._admission()
        if self.drain_deadline is None and admission is not None:
            self.drain_deadline = time.monotonic() + self.drain_seconds
            admission.drain()
            log.info("draining: %d requests in flight, up to %ss", admission.in_flight, self.drain_seconds)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.drain_deadline is None:
            return False
        admission = self._admission()
        if admission.in_flight == 0:
            log.info("drained: no request in flight")
            return True
        if time.monotonic() >= self.drain_deadline:
            log.warning("drain time is up with %d requests in flight; they are cut off", admission.in_flight)
            return True
        return False

    def _admission(self):
        """None before the lifespan has built the tutor (a signal during start-up just stops the server)."""
        app = self.config.app
        tutor = getattr(app.state, "tutor", None) if isinstance(app, FastAPI) else None
        return tutor.admission if tutor is not None else None


def server_config(app: Any, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """How uvicorn serves the app. The drain phase already waited for in-flight requests; uvicorn's own wait only
    covers the last bytes. h11, with its bound on a request's line and headers: httptools, uvicorn's pick when
    installed, reads headers of any size and count (a 20 MB header was read whole, before any key check); parsing
    costs nothing beside generation."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=FINAL_SHUTDOWN_SECONDS,
                          timeout_keep_alive=settings.keep_alive_seconds, http="h11",
                          h11_max_incomplete_event_size=settings.max_header_bytes)


def run_server(app: FastAPI, settings: Settings, log_level: str = "info") -> int:
    """Serve until SIGTERM, then drain (see DrainingServer). Returns the exit code."""
    logging.basicConfig(level="DEBUG" if log_level == "trace" else log_level.upper(),  # logging knows no trace
                        format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    DrainingServer(server_config(app, settings, log_level), settings.drain_seconds).run()
    return app.state.exit_code


class UnsafeBind(RuntimeError):
    pass


def check_bind(settings: Settings) -> None:
    """With no API keys the server is open, so it may listen on loopback only."""
    if not settings.api_key_entries and not is_loopback(settings.host):
        raise UnsafeBind(
            f"refusing to listen on {settings.host} with no API keys: set ZEPHYR_API_KEYS or ZEPHYR_API_KEYS_FILE, "
            "or bind 127.0.0.1"
        )


def terminate_process() -> None:
    """Ask uvicorn for its graceful shutdown, so the supervisor (Kubernetes, systemd) restarts us."""
    os.kill(os.getpid(), signal.SIGTERM)


def safety_guard(settings: Settings) -> SafetyGuard | None:
    """The chat safety guard with its encoder loaded (a second or two), or None where ZEPHYR_SAFETY_GUARD is off."""
    if not settings.safety_guard:
        log.warning("ZEPHYR_SAFETY_GUARD=false: chats and completions are not screened for harmful requests")
        return None
    guard = SafetyGuard(load_record(settings.safety_record), settings.safety_threshold)
    guard.judge("warm-up")  # loads the encoder now, not in the first student's request
    log.info("safety guard: %s at threshold %.5f, a sentence alone %.5f, self-harm %s (%s)", guard.record.encoder,
             guard.threshold, guard.sentence_threshold,
             "off" if guard.record.self_harm_threshold is None else f"{guard.record.self_harm_threshold:.4f}",
             settings.safety_record or "the shipped record")
    if settings.safety_screen_answers:
        log.info("safety guard reads answers too, a sentence at a time, at threshold %.4f",
                 guard.for_answers().threshold)
    else:
        log.warning("ZEPHYR_SAFETY_SCREEN_ANSWERS=false: the model's answers are shown unread by the guard")
    return guard


def question_domain_encoder(calibration: MCQCalibration | None, guard: SafetyGuard | None) -> Any:
    """all-MiniLM-L6-v2 for a record whose `auto` reads each question's domain (the guard's own where it is on),
    loaded and run once now, not in the first student's request; None for any other record."""
    if calibration is None or not calibration.reads_question_domain:
        return None
    encoder = guard.encoder if guard is not None else load_encoder()
    embed(encoder, ["warm-up"])
    log.info("/mcq auto reads which set each question reads like (%s)", ", ".join(QUESTION_DOMAINS))
    return encoder


async def _cancelled(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _log_start(settings: Settings, entry: RegistryEntry, calibration: MCQCalibration | None) -> None:
    """What the server says at start about the model it serves and the settings that change its answers."""
    if calibration is None:
        log.warning("%s has no MCQ calibration record: /mcq's `auto` answers by cloze (uncalibrated); "
                    "run `zephyr eval calibrate --model %s` to choose and calibrate its method", entry.name, entry.name)
    else:
        log.info("/mcq's `auto` for %s: %s (weights %s, %d demonstrations, calibrated %s)", entry.name,
                 calibration.method, calibration.weights, calibration.demonstrations_source.get("count", 0),
                 calibration.created_at.date())
    served = served_dtype(entry.path, settings.dtype)
    if calibration is not None and calibration.dtype not in (None, served):
        log.warning("%s's MCQ calibration was fitted on scores computed in %s, and the engine computes in %s: "
                    "its weights and confidences may be slightly off; run `zephyr eval calibrate --model %s` "
                    "here, or set ZEPHYR_DTYPE=%s", entry.name, calibration.dtype, served, entry.name,
                    calibration.dtype)
    if scores_depend_on_batch(entry.path, settings.dtype):
        log.warning("bf16 on a CPU with AMX: an option's score moves by a few tenths of a nat with what shares "
                    "its batch and the prefix cache, so a near-tied /mcq question can be answered differently "
                    "cold and warm; ZEPHYR_DTYPE=float32 makes answers repeatable at ~2.6x the scoring time "
                    "(docs/evaluation.md, \"Cloze through the prefix cache\")")
    if not settings.log_generations:
        log.warning("ZEPHYR_LOG_GENERATIONS=false: no generation is logged, so nothing reaches human review")


def create_app(
    settings: Settings | None = None,
    engine_factory: EngineFactory | None = None,
    on_fatal: Callable[[], None] = terminate_process,
) -> FastAPI:
    """`on_fatal` runs when the engine cannot serve (warm-up failed, engine died); tests replace it."""
    settings = settings or Settings()
    engine_factory = engine_factory or VLLMEngine.start
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for line in unknown_variables(os.environ):
            log.warning(line)
        registry = Registry(settings.models_dir)
        entry = ensure_default_model(registry) if settings.model == DEFAULT_MODEL else registry.get(settings.model)
        guard = await asyncio.to_thread(safety_guard, settings)
        calibration = entry.manifest.mcq_calibration
        # before the engine's minute of start-up: a missing encoder fails the start at once
        encoder = await asyncio.to_thread(question_domain_encoder, calibration, guard)
        # What is started is stopped, in reverse order, however far the start got.
        async with AsyncExitStack() as started:
            started.callback(gc.unfreeze)  # last: let native extensions free what they own before exit
            engine = engine_factory(settings, entry.path, entry.name)
            started.callback(engine.shutdown)
            redactor = Redactor(settings.pii_entities, settings.student_id_pattern) if settings.pii_redaction else None
            generation_log = GenerationLog(
                settings.resolved_db_url, settings.resolved_spill_path, metrics, redactor,
                batch_size=settings.log_batch_size, flush_seconds=settings.log_flush_seconds,
                queue_size=settings.log_queue_size, retry_seconds=settings.log_retry_seconds,
                enabled=settings.log_generations,
            )
            await generation_log.start()
            started.push_async_callback(generation_log.close)
            app.state.registry_entry = entry
            app.state.engine = engine
            app.state.generation_log = generation_log
            # the tutor's requests are what the stall watchdog (_watch_engine) times
            tutor = app.state.tutor = Tutor(WatchedEngine(engine), settings, metrics, generation_log, calibration,
                                            guard, encoder, model_revision=entry.manifest.revision)
            started.callback(tutor.guard_thread.shutdown, wait=False, cancel_futures=True)
            started.push_async_callback(tutor.candidates.close)
            _log_start(settings, entry, calibration)
            app.state.redactor = redactor
            app.state.review_store = ReviewStore(generation_log.engine, ReviewPolicy(
                overlap=settings.review_overlap, lease=timedelta(minutes=settings.review_lease_minutes),
                candidate_wait=timedelta(minutes=settings.review_candidate_wait_minutes),
            ), names=app.state.keyring.names)
            app.state.sessions.store = app.state.review_store
            if app.state.keyring.open:
                log.warning("no API keys configured: the server is open to anyone on this machine (loopback only)")
            app.state.rekeyed = asyncio.create_task(_rekey_legacy_digests(app))
            background = [asyncio.create_task(_warm_up(app)), asyncio.create_task(_watch_engine(app)),
                          app.state.rekeyed]
            if settings.log_retention_days is not None:
                background.append(asyncio.create_task(_keep_retention(app, settings.log_retention_days)))
            started.push_async_callback(_cancelled, background)
            yield

    docs = settings.api_docs
    app = FastAPI(title="Zephyr tutor", version=__version__, lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = asyncio.Event()
    app.state.engine_stalled = False
    app.state.guard_stalled = False
    app.state.exit_code = 0
    app.state.on_fatal = on_fatal
    secret = install_secret(settings.home, settings.session_secret)
    app.state.keyring = KeyRing(settings.api_key_entries, secret)
    review_routes.guidelines_path(settings)  # a guidelines file that is not there stops the start, like a keys file
    app.state.sessions = Sessions(secret, settings.review_session_hours * 3600)
    app.state.rate_limiter = RateLimiter(settings.rate_limit)
    app.state.auth_failures = Limiter(settings.auth_failure_limit, "failed authentications per address",
                                      code="too_many_failed_authentications")
    app.state.sign_ins = Limiter(settings.sign_in_limit, "review sign-ins per address")
    app.state.review_requests = Limiter(settings.review_request_limit, "chats marked for review per key",
                                        code="review_request_limit_exceeded")
    install_error_handlers(app)
    for router in (health.router, openai.router, mcq.router, review_routes.router):
        app.include_router(router)
    _document_stream(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if app.state.keyring.open:  # however the app is started (zephyr serve, uvicorn --factory, a test)
        app.add_middleware(LoopbackOnly)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts every refusal too
    return app


def _document_stream(app: FastAPI) -> None:
    """The OpenAPI schema with the streamed chat chunk's models among its components (routes/openai.py)."""
    make_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            openai.document_stream(make_schema())  # FastAPI keeps the schema it made in app.openapi_schema
        return app.openapi_schema

    app.openapi = openapi


async def _rekey_legacy_digests(app: FastAPI) -> None:
    """Rows from before keyed digests hold plain SHA-256 digests of keys: replace those of configured keys, then
    (once per database, and never in open mode, which knows no keys) the digests of keys no longer configured.
    Off the start-up path and best effort: a database that is away is tried again at the next start."""
    keyring, store = app.state.keyring, app.state.review_store
    try:
        # after the start's spill replay: a spill an older version wrote holds plain digests too
        await app.state.generation_log.replayed_at_start()
        if changed := await store.rekey(keyring.legacy):
            log.info("replaced %d plain API-key digests in the database with keyed ones", changed)
        if not keyring.open and (changed := await store.retire_unknown_digests(keyring.known_digests,
                                                                                keyring.retired)):
            log.info("replaced %d digests of API keys no longer configured with keyed ones (once per database)",
                     changed)
    except Exception as exc:
        log.warning("could not replace plain API-key digests in the database (retried at the next start): %s", exc)


RETENTION_INTERVAL_SECONDS = 3600


async def _keep_retention(app: FastAPI, days: int) -> None:
    """Hourly, delete log rows older than `days` (service.store.retention: items under review stay). Replicas may
    all run it: a row deleted twice is deleted once. A database that is away is tried again the next hour."""
    generation_log = app.state.generation_log
    await generation_log.replayed_at_start()  # rows the spill brings back are pruned with the rest
    while True:
        cutoff = datetime.now(UTC) - timedelta(days=days)
        try:
            pruned = await retention.prune(generation_log.engine, cutoff,
                                           on_batch=lambda done: app.state.metrics.log_pruned_rows.inc(done.rows))
            if pruned.rows:
                log.info("deleted %d generation-log rows older than %d days (ZEPHYR_LOG_RETENTION_DAYS)",
                         pruned.rows, days)
        except Exception as exc:
            log.warning("could not delete generation-log rows past the retention (tried again in an hour): %s", exc)
        try:
            if gone := await generation_log.prune_rejected(cutoff):
                app.state.metrics.log_pruned_rows.inc(gone)
                log.info("deleted %d refused rows older than %d days from %s", gone, days,
                         generation_log.rejected_path)
        except Exception as exc:
            log.warning("could not prune %s (tried again in an hour): %s", generation_log.rejected_path, exc)
        await asyncio.sleep(RETENTION_INTERVAL_SECONDS)


async def _warm_up(app: FastAPI) -> None:
    """Readiness means the engine has answered: a short chat, and a letter-constrained MCQ step (its first
    use costs seconds on CPU, which the first student would otherwise wait through)."""
    try:
        await _warm_up_engine(app.state.tutor)
    except Exception:
        log.exception("engine warm-up failed; the server exits so that it is restarted")
        app.state.exit_code = 1
        app.state.on_fatal()
        return
    # Torch, transformers, vLLM and Presidio leave ~700k long-lived objects; a full collection walking them
    # stalls every stream for ~0.5 s. Freezing them out of the collector's view after start-up avoids that.
    gc.collect()
    gc.freeze()
    app.state.ready.set()
    app.state.metrics.engine_ready.set(1)
    log.info("engine warmed up; %s is ready", app.state.tutor.model_name)


async def _warm_up_engine(tutor: Tutor) -> None:
    prompt = tutor.encode_chat([{"role": "user", "content": "Hello"}])
    async for _ in tutor.engine.generate(prompt, GenParams(max_tokens=2, temperature=0.0), "warmup-chat"):
        pass
    letters = tutor.letter_ids(4, leading_space=False)
    constrained = GenParams(max_tokens=1, temperature=0.0, allowed_token_ids=letters, logprob_token_ids=letters)
    async for _ in tutor.engine.generate(prompt, constrained, "warmup-mcq"):
        pass
    scored = GenParams(max_tokens=1, temperature=0.0, prompt_logprobs=True, skip_reading_prefix_cache=False)
    # /mcq's cloze: prompt log-probs; after the record's demonstrations, whose KV blocks every cloze prompt then
    # finds in the prefix cache ("Question:" because a trailing blank line tokenizes otherwise at the text's end).
    demonstrations = tutor.calibration.demonstrations if tutor.calibration else ""
    cloze_prompt = (tutor.engine.tokenizer.encode(demonstrations + "Question:", add_special_tokens=False)
                    if demonstrations else prompt)
    async for _ in tutor.engine.generate(cloze_prompt, scored, "warmup-cloze"):
        pass


def _death_cause(engine: Engine, oom_kills_at_start: int | None) -> str:
    """Why the engine died, where the kernel tells: an OOM kill in our cgroup, or a process killed by SIGKILL."""
    kills = memory.oom_kills()
    codes = getattr(engine, "exit_codes", list)()
    if kills is not None and oom_kills_at_start is not None and kills > oom_kills_at_start:
        return (" of memory exhaustion: the kernel's out-of-memory killer ended it (lower ZEPHYR_KV_CACHE_GIB or "
                "ZEPHYR_MAX_NUM_SEQS, or give the server more memory)")
    if -9 in codes:
        return (" (its process was killed with SIGKILL, most likely by the kernel's out-of-memory killer: lower "
                "ZEPHYR_KV_CACHE_GIB or ZEPHYR_MAX_NUM_SEQS, or give the server more memory)")
    return f" (engine process exit codes {codes})" if codes else ""


async def _watch_engine(app: FastAPI) -> None:
    """A dead engine cannot come back in this process: stop being ready, then exit so the supervisor
    restarts the server (through SIGTERM, so uvicorn finishes what it can first). A hung one, past
    ZEPHYR_ENGINE_STALL_SECONDS once ready (warm-up has the startup probe), is killed first, which fails its
    requests in flight as a death does. An engine idle for half that is asked for one token, so a hang is found
    while no student waits on it."""
    engine: WatchedEngine = app.state.tutor.engine
    stall_limit = app.state.settings.engine_stall_seconds
    oom_kills_at_start = memory.oom_kills()
    stalled_for: float | None = None
    killed_at = 0.0
    probe: asyncio.Task | None = None
    try:
        while True:
            await asyncio.sleep(WATCHDOG_SECONDS)
            # A killed engine errors within a second or two; the server exits regardless once the wait is up.
            if engine.errored or (stalled_for is not None and time.monotonic() - killed_at > STALL_KILL_SECONDS):
                app.state.ready.clear()
                app.state.metrics.engine_ready.set(0)
                cause = (f" after it stalled for {stalled_for:.0f} s and was killed (ZEPHYR_ENGINE_STALL_SECONDS)"
                         if stalled_for is not None else _death_cause(engine, oom_kills_at_start))
                log.critical("the inference engine died%s; shutting the server down so it is restarted", cause)
                app.state.exit_code = 1
                app.state.on_fatal()
                return
            if stalled_for is not None or not stall_limit or not app.state.ready.is_set():
                continue
            if (busy := app.state.tutor.encoder_busy_seconds()) >= stall_limit:
                # A Python thread cannot be stopped: every chat would wait behind this task, so a new process.
                app.state.guard_stalled = True
                app.state.ready.clear()
                log.critical("the safety guard's encoder thread has run one task for %.0f s "
                             "(ZEPHYR_ENGINE_STALL_SECONDS); shutting the server down so it is restarted", busy)
                app.state.exit_code = 1
                app.state.on_fatal()
                return
            if (waited := engine.stalled_seconds()) >= stall_limit:
                stalled_for, killed_at = waited, time.monotonic()
                app.state.engine_stalled = True
                app.state.tutor.admission.engine_lost = True  # refused from now, not from when vLLM notices
                app.state.ready.clear()
                app.state.metrics.engine_ready.set(0)
                log.critical("the inference engine gave no output for %.0f s while requests waited on it; "
                             "killing it", waited)
                engine.kill()
            elif (probe is None or probe.done()) and engine.idle_seconds() >= stall_limit / 2:
                probe = asyncio.create_task(_probe_engine(engine))
    finally:
        if probe is not None:
            probe.cancel()


async def _probe_engine(engine: Engine) -> None:
    """One token from an idle engine; the watchdog times it as any request. Not logged: no student asked it."""
    with contextlib.suppress(Exception):  # a dead engine is found by `errored`, a hung one by the wait
        async for _ in engine.generate(engine.tokenizer.encode("Hello", add_special_tokens=False),
                                       GenParams(max_tokens=1, temperature=0.0), f"probe-{time.monotonic_ns()}"):
            pass
