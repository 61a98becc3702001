"""All configuration, read once from ``ZEPHYR_*`` environment variables (and CLI flags of the same names)."""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from limits import parse_many
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"

DEFAULT_SYSTEM_PROMPT = (
    "You are Zephyr, a patient science tutor for students. Explain ideas step by step in plain language, "
    "check the student's reasoning, and say so when you are not sure."
)


# What zephyr/pii.py's Redactor finds, by Presidio's entity names and ours.
PII_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "STUDENT_ID", "STREET_ADDRESS", "DATE_OF_BIRTH")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def container_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs this process may use by its cgroup's CFS quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), or None
    where there is none: a quota throttles, it does not shrink the CPU set threads are counted from."""
    try:
        if (v2 := root / "cpu.max").is_file():
            quota, period = v2.read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


class Settings(BaseSettings):
    # A refused setting's error never quotes its value: API keys and secrets are settings too.
    model_config = SettingsConfigDict(env_prefix="ZEPHYR_", env_file=None, extra="ignore", hide_input_in_errors=True)

    # Registry and what is served.
    home: Path = Field(default=Path("~/.cache/zephyr"), description="Model registry and local state")
    model: str = Field(default=DEFAULT_MODEL, description="Registry model to serve")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    # Engine (vLLM) arguments.
    max_model_len: int = Field(default=2048, ge=16, le=1_048_576)
    memory_share: float = Field(default=0.35, gt=0, le=1, description="vLLM gpu_memory_utilization (RAM share on CPU)")
    # On CPU the share is of the host's RAM, not of a container's memory limit: containers set this instead.
    kv_cache_gib: float | None = Field(default=None, gt=0, le=1_048_576, allow_inf_nan=False,
                                       description="KV cache size; overrides memory_share")
    enforce_eager: bool = True
    # auto: the checkpoint's dtype, but fp32 for a bf16 one on a CPU without AMX, where fp32 is faster
    # (zephyr.numerics.resolve_dtype).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_num_seqs: int = Field(default=64, ge=1, le=1_000_000)
    # Prefix caching reuses whole KV blocks. vLLM's CPU default (128 tokens) is longer than most prompts here, so
    # the shared system prompt never hit the cache; 32 is the smallest the CPU backend takes.
    block_size: int = Field(default=32, gt=0, le=1024, description="KV cache block size in tokens")
    # vLLM on CPU keeps cores free of its compute threads for its scheduler (one by default): on a 2-core node that
    # halves the compute. An explicit VLLM_CPU_NUM_OF_RESERVED_CPU wins over this. The server's engine only: offline
    # engines keep the core in process (offline/engine.py), where vLLM reserves nothing.
    cpu_reserved_cores: int = Field(default=0, ge=0, le=1024,
                                    description="CPU cores kept free of vLLM's compute threads")
    seed: int = 0

    # Tutoring behaviour.
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    system_prompt_enabled: bool = True
    # What a chat is sampled with when its client sends no `temperature` / `top_p` (most chat clients send none).
    # OpenAI's 1.0 made this model name the key in 5% of SciQ validation answers, 0.3 / 0.9 in 20%
    # (docs/evaluation.md, "Chat sampling when the client sends none").
    chat_temperature: float = Field(default=0.3, ge=0, le=2, description="a chat's temperature when its request "
                                    "sets none")
    chat_top_p: float = Field(default=0.9, gt=0, le=1, description="a chat's top_p when its request sets none")
    mcq_explain_max_tokens: int = Field(default=256, ge=1, le=8192)
    # /mcq answers null (abstains) below this confidence unless the request sets its own; None: never.
    mcq_min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    # A multiple-choice question pasted into a chat is answered as /mcq answers it (`auto`), and the model explains
    # from that answer (zephyr/chat_mcq.py; docs/evaluation.md, "Multiple-choice questions asked in chat").
    chat_mcq: bool = Field(default=True, description="answer a multiple-choice question in a chat message as /mcq "
                           "does, then let the model explain")
    # Below it the chat says it is not sure of the option it names. 0.5 is the lowest confidence at which /mcq's
    # answers were right four times in five on validation (docs/evaluation.md, "Choosing `min_confidence`").
    chat_mcq_sure_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    # After naming an option the model may not conclude with another ("so the answer is D"; zephyr/chat_mcq.py's
    # CONCLUSIONS): chosen on validation (docs/evaluation.md, "An answer that keeps to its option").
    chat_mcq_keep_answer: bool = Field(default=True, description="forbid a chat's explanation to conclude with an "
                                       "option other than the one its opening named")

    # The chat safety guard (zephyr/safety.py): a student's message asking for serious harm is refused, one about
    # harming themselves answered with where to find help, without the model (finish_reason "content_filter").
    safety_guard: bool = Field(default=True, description="refuse chat and completion requests the safety guard "
                               "flags (docs/evaluation.md, \"The chat safety guard\")")
    safety_record: Path | None = Field(default=None, description="the guard's record; default the shipped one, "
                                       "fitted by `zephyr eval safety`")
    safety_threshold: float | None = Field(default=None, ge=0.0, le=1.0, description="flag at this probability of "
                                           "harm instead of the record's threshold (lower: more refusals)")
    safety_screen_answers: bool = Field(default=True, description="the guard also reads the model's answers, a "
                                        "sentence at a time, and withholds a flagged sentence and what follows it "
                                        "(streams then show an answer a sentence at a time)")

    # Access and limits.
    api_keys: str = Field(default="", description="Comma-separated role:key entries")
    api_keys_file: Path | None = None
    # 16 random URL-safe characters are 96 bits: past guessing at any rate limit. Shorter keys are refused at start.
    min_api_key_chars: int = Field(default=16, ge=1, le=1024, description="Characters every API key must have")
    rate_limit: str = Field(default="600/minute", description="Units of work per API key, `limits` notation: a "
                            "chat counts its `n`, an MCQ batch its questions")
    auth_failure_limit: str = Field(default="30/minute", description="Failed authentications per client address; "
                                    "past it the address is refused (429) before its keys are checked")
    sign_in_limit: str = Field(default="10/minute", description="Review sign-in attempts per client address")
    review_request_limit: str = Field(default="30/hour", description="Chats one key may mark `X-Zephyr-Review: "
                                      "true` (each costs a second answer and reviewers' time)")
    api_docs: bool = Field(default=False, description="Serve /docs and /redoc (they load scripts from a CDN); "
                           "/openapi.json is always served")
    max_body_bytes: int = Field(default=1_000_000, gt=0, le=100_000_000)
    max_header_bytes: int = Field(default=65_536, ge=4_096, le=4_194_304, description="Bytes a request's line and "
                                  "headers may take together, checked as they arrive; past it a 400 and the "
                                  "connection closed")
    max_prompt_tokens: int | None = Field(default=None, gt=0, description="Defaults to the model's context length")
    max_prompt_chars: int | None = Field(default=None, gt=0, description="Characters a prompt may hold before it "
                                         "is tokenized; default 16 per allowed prompt token")
    max_in_flight: int = Field(default=256, ge=1, le=100_000, description="Requests admitted at once; beyond that 503")
    max_n: int = Field(default=8, ge=1, le=128)
    max_mcq_batch: int = Field(default=64, ge=1, le=1024, description="Questions one /mcq/batch may hold; at most "
                               "max_in_flight, since each question is admitted as a request")
    engine_stall_seconds: float = Field(default=120, ge=0, le=86_400, description="Seconds a ready engine may give "
                                        "no output while requests wait on it before it is killed and the server "
                                        "exits to be restarted (a hung engine), and the most a request waits on the "
                                        "safety guard's thread (503) or one task runs there (restart); 0 turns both "
                                        "off")
    drain_seconds: int = Field(default=30, ge=0, le=3600)
    keep_alive_seconds: int = Field(default=75, gt=0, le=3600, description="How long an idle client connection "
                                    "stays open. "
                                    "Longer than a proxy's idle timeout (nginx and cloud balancers: 60 s), so the "
                                    "server never closes a connection just as the proxy or client reuses it")

    # Generation log.
    log_generations: bool = Field(default=True, description="false: write no generation rows (measuring the log's "
                                  "own cost; nothing then reaches review)")
    db_url: str | None = Field(default=None, description="SQLAlchemy async URL; default a SQLite file in home")
    spill_path: Path | None = None
    log_batch_size: int = Field(default=64, ge=1, le=10_000)
    log_flush_seconds: float = Field(default=0.5, gt=0, le=60)
    # 0 would make asyncio's queue unbounded, hence ge=1.
    log_queue_size: int = Field(default=10_000, ge=1, le=10_000_000, description="Rows waiting for the database; "
                                "past it they spill to disk")
    log_retry_seconds: float = Field(default=5.0, gt=0, le=3600)
    log_retention_days: int | None = Field(
        default=None, ge=1, le=36_500, description="Delete generation-log rows older than this many days, hourly "
        "(items under review are kept; `zephyr log prune --older-than-days N --include-reviewed --yes` deletes those "
        "too); "
        "empty: keep all")
    pii_redaction: bool = True
    pii_entities: list[str] = list(PII_ENTITIES)
    student_id_pattern: str = r"\b[A-Z]{1,3}\d{6,9}[A-Z]?\b"  # a trailing check letter too (S1234567A)

    # Offline evaluation (evals/).
    data_dir: Path = Field(default=Path(__file__).resolve().parents[2] / "shared" / "data",
                           description="Benchmark files in ../shared/data's layout")
    eval_results_dir: Path | None = Field(default=None, description="Evaluation results; default HOME/eval-results")

    # Offline quantization (quant/): llm-compressor pins other transformers/compressed-tensors versions than vLLM.
    quant_env: Path | None = Field(default=None, description="Virtualenv with llm-compressor; default HOME/quant-env")

    # Human review (docs: README "Review").
    review_policy: Literal["off", "requested", "sample"] = Field(
        default="sample", description="Which chats are queued for review: none, client-marked only, or "
        "client-marked plus a random share")
    review_share: float = Field(default=0.05, ge=0, le=1, description="Share of chats sampled for review")
    review_candidate: Literal["resample", "remote", "none"] = Field(
        default="resample", description="Second answer: the served model again, another served model, or none")
    review_candidate_temperature: float = Field(default=1.0, ge=0, le=2)
    review_candidate_url: str | None = Field(default=None, description="OpenAI-compatible base URL (remote)")
    # at most the log's `model` column (PostgreSQL refuses a longer one; every candidate row would spill)
    review_candidate_model: str | None = Field(default=None, max_length=128)
    review_candidate_api_key: str | None = None
    review_max_pending: int = Field(default=16, ge=0, le=10_000, description="Candidate generations queued at once")
    review_overlap: int = Field(default=2, ge=1, le=100, description="Reviewers who judge each item")
    review_lease_minutes: float = Field(default=30, gt=0, le=24 * 60,
                                        description="An item shown but not judged is held this long")
    review_candidate_wait_minutes: float = Field(
        default=10, gt=0, le=24 * 60,
        description="After this, an item whose candidate never arrived is reviewed alone")
    session_secret: str | None = Field(default=None, min_length=32, description=(
        "Keys the digests of API keys in the database and signs review sign-in cookies; default a random secret "
        "made once in HOME/secret. Replicas sharing a database must share it; changing it signs everyone out "
        "and starts reviewers' identities afresh"))
    review_session_hours: float = Field(default=12, gt=0, le=24 * 30)
    review_guidelines: Path | None = Field(default=None, description=(
        "Markdown file shown to reviewers as their guidelines (what each strength and flag means); default the "
        "file shipped in service/review/guidelines.md"))

    @field_validator("home", "api_keys_file", "spill_path", "data_dir", "eval_results_dir", "quant_env",
                     "review_guidelines", "safety_record", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # An empty variable (ZEPHYR_HOME=) would be the current folder: the registry, the database and the secret
        # would land wherever the command was started.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: unset it, or give a path")
        return value

    @field_validator("kv_cache_gib", "mcq_min_confidence", "safety_threshold", "max_prompt_tokens", "max_prompt_chars",
                     "log_retention_days", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # The documented "empty" of an optional number (a chart's `config` value left "", `VAR=` in a shell) is its
        # default, not "Input should be a valid number" and a server that will not start.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("home", "api_keys_file", "spill_path", "data_dir", "eval_results_dir", "quant_env",
                     "review_guidelines", "safety_record", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("rate_limit", "auth_failure_limit", "sign_in_limit", "review_request_limit", mode="after")
    @classmethod
    def _one_limit(cls, value: str, info: ValidationInfo) -> str:
        """One positive `limits` item ("600/minute"), or empty for off: refused at start, not by a traceback when
        the server builds its limiters, nor by a "0/minute" that would refuse every request with a 429."""
        if not value.strip():
            return value
        variable = f"ZEPHYR_{info.field_name.upper()}"
        try:
            items = parse_many(value)
        except ValueError:
            raise ValueError(f"{variable} {value!r} is not a limit; write it as AMOUNT/PERIOD, e.g. 600/minute, "
                             "or leave it empty to turn the limit off") from None
        if len(items) != 1 or items[0].amount < 1:
            raise ValueError(f"{variable} {value!r} must be one limit of at least 1 per period, e.g. 600/minute "
                             "(empty turns it off)")
        return value

    @field_validator("pii_entities", mode="after")
    @classmethod
    def _known_entities(cls, value: list[str]) -> list[str]:
        # A misspelt name would redact nothing of its kind, silently: students' emails would reach the log.
        unknown = [name for name in value if name not in PII_ENTITIES]
        if unknown:
            raise ValueError(f"ZEPHYR_PII_ENTITIES names {', '.join(map(repr, unknown))}, which the redactor does not "
                             f"find; known: {', '.join(PII_ENTITIES)}")
        return value

    @field_validator("student_id_pattern", mode="after")
    @classmethod
    def _compiles(cls, value: str) -> str:
        import regex  # what Presidio compiles patterns with

        try:
            compiled = regex.compile(value)
        except regex.error as exc:
            raise ValueError(f"ZEPHYR_STUDENT_ID_PATTERN is not a regular expression: {exc}") from None
        if compiled.fullmatch(""):  # "" (an empty variable) would redact no student id, silently
            raise ValueError("ZEPHYR_STUDENT_ID_PATTERN matches the empty string, so it would find no student id; "
                             r"unset it for the default (\b[A-Z]{1,3}\d{6,9}[A-Z]?\b) or give one that needs "
                             "characters")
        return value

    @model_validator(mode="after")
    def _system_prompt_says_something(self) -> Settings:
        if self.system_prompt_enabled and not self.system_prompt.strip():
            # a blank system turn would still replace the chat template's own default one
            raise ValueError("ZEPHYR_SYSTEM_PROMPT is blank; to send no system prompt set "
                             "ZEPHYR_SYSTEM_PROMPT_ENABLED=false, else unset it for the default")
        return self

    @model_validator(mode="after")
    def _redaction_finds_something(self) -> Settings:
        if self.pii_redaction and not self.pii_entities:
            raise ValueError("ZEPHYR_PII_ENTITIES is empty, so redaction would find nothing; name what to redact, or "
                             "set ZEPHYR_PII_REDACTION=false to turn it off")
        return self

    @model_validator(mode="after")
    def _remote_candidate_complete(self) -> Settings:
        if self.review_candidate == "remote" and not (self.review_candidate_url and self.review_candidate_model):
            raise ValueError("ZEPHYR_REVIEW_CANDIDATE=remote needs ZEPHYR_REVIEW_CANDIDATE_URL and "
                             "ZEPHYR_REVIEW_CANDIDATE_MODEL")
        return self

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def vllm_engine_kwargs(self, model_path: Path) -> dict:
        """vLLM engine arguments shared by the server and offline evaluation, so both compute the same numbers. The
        KV cache is sized by what these settings can use on this model (zephyr/memory.py), not by a share of the
        whole host."""
        from zephyr import memory
        from zephyr.numerics import served_dtype

        return {
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.memory_share,
            "kv_cache_memory_bytes": memory.kv_cache_bytes(model_path, self),
            "enforce_eager": self.enforce_eager,
            "dtype": served_dtype(model_path, self.dtype),
            "max_num_seqs": self.max_num_seqs,
            "block_size": self.block_size,
            "seed": self.seed,
        }

    @property
    def cpu_reserved_cores_in_effect(self) -> str:
        """vLLM's own variable, where an operator set it, wins over `cpu_reserved_cores`."""
        return os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", str(self.cpu_reserved_cores))

    def vllm_environment(self) -> dict[str, str]:
        """Environment for vLLM's engine processes (read when they start), shared by the server and evals.

        In a container whose CPU limit is a quota rather than a CPU set (Kubernetes without the static CPU
        manager), vLLM's CPU build would start one compute thread per core of the whole node and pin them there,
        to be throttled to the quota. Then its threads are left unpinned and sized to the quota, unless the
        operator set VLLM_CPU_OMP_THREADS_BIND or OMP_NUM_THREADS. A GPU build's threads are vLLM's own to set."""
        from zephyr import memory

        environment = {"VLLM_CPU_NUM_OF_RESERVED_CPU": self.cpu_reserved_cores_in_effect}
        operator_set = {"VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"} & set(os.environ)
        if operator_set or not memory.kv_cache_on_host():  # an operator's threads, or a GPU's worker: left alone
            return environment
        quota = container_cpu_quota()
        if quota is not None and quota < len(os.sched_getaffinity(0)):
            environment |= {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, int(quota)))}
        return environment

    @property
    def resolved_eval_results_dir(self) -> Path:
        return self.eval_results_dir or self.home / "eval-results"

    @property
    def served_system_prompt(self) -> str | None:
        """The system prompt the server puts before a chat that has none; None when it adds none."""
        return self.system_prompt if self.system_prompt_enabled else None

    @property
    def resolved_quant_env(self) -> Path:
        return self.quant_env or self.home / "quant-env"

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite+aiosqlite:///{self.home / 'zephyr.db'}"

    @property
    def resolved_spill_path(self) -> Path:
        return self.spill_path or self.home / "spill" / "generations.jsonl"

    @cached_property
    def api_key_entries(self) -> list[tuple[str, str, str | None]]:
        """(role, key, name) from ZEPHYR_API_KEYS and ZEPHYR_API_KEYS_FILE. An entry is `role:key`, or `name=role:key`
        to give the key's holder a name the review page and statistics show (no name: a prefix of the key's
        digest). The name goes before the role because a key may itself hold `:` or `=` (the key is all that
        follows the first `:`), so entries written before names existed keep their meaning."""
        # Each entry with where it came from: an error names it by place, never by its text.
        lines = [(f"ZEPHYR_API_KEYS entry {n}", part) for n, part in enumerate(self.api_keys.split(","), start=1)]
        if self.api_keys_file is not None:
            if not self.api_keys_file.is_file():
                raise ValueError(f"ZEPHYR_API_KEYS_FILE={self.api_keys_file} does not exist")
            try:
                text = self.api_keys_file.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no key's text
            except (OSError, UnicodeDecodeError) as exc:  # a Secret mounted 0400 for another user, a binary file
                raise ValueError(f"ZEPHYR_API_KEYS_FILE={self.api_keys_file} cannot be read: "
                                 f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
            lines += [(f"ZEPHYR_API_KEYS_FILE line {n}", line) for n, line in enumerate(text.splitlines(), start=1)]
        entries = []
        seen: dict[str, tuple[str, str, str]] = {}  # key: the first entry's place, role and name
        for place, raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            head, sep, key = line.partition(":")
            name, _, role = head.rpartition("=")
            name, role, key = " ".join(name.split()), role.strip(), key.strip()
            if not sep or role not in ROLES or not key:
                # Named by position, never quoted: an entry without its ':' may be a bare key, and this message
                # reaches start-up logs and pod events.
                raise ValueError(f"{place} must be role:key or name=role:key with role one of {', '.join(ROLES)}")
            if len(name) > MAX_KEY_NAME_CHARS:
                raise ValueError(f"{place}: its name is longer than {MAX_KEY_NAME_CHARS} characters")
            if not key.isprintable():  # a tab, a control character: no client sends it as typed
                raise ValueError(f"{place}: its key holds a character that is not printable; use printable ASCII "
                                 "(letters, digits, punctuation)")
            if not key.isascii():
                # The review page's sign-in sends it in JSON and works; an `Authorization` header carries bytes the
                # server reads as Latin-1, so a client sending UTF-8 (or refusing such a header) never matches
                logging.getLogger("zephyr.settings").warning(
                    "%s: its key holds characters outside ASCII: it signs in on the review page, but API clients "
                    "sending it in the Authorization header will not match it; prefer printable ASCII", place)
            if len(key) < self.min_api_key_chars:
                raise ValueError(f"{place}: its key is shorter than {self.min_api_key_chars} characters, short "
                                 "enough to guess; make one with "
                                 "`python -c 'import secrets; print(secrets.token_urlsafe(24))'` "
                                 "(or lower ZEPHYR_MIN_API_KEY_CHARS)")
            first = seen.setdefault(key, (place, role, name))
            if first[0] != place:
                if first[1:] != (role, name):  # one key, two roles: the last would win, silently
                    raise ValueError(f"{place} gives the key of {first[0]} another role or name; a key has one")
                continue
            entries.append((role, key, name or None))
        return entries


# ZEPHYR_ variables read by the project's tools, not by the server (load tests, fuzzers, test databases, the CLI's
# client commands), and those Kubernetes' service links make for a Service named "zephyr" where they are on.
TOOL_VARIABLES = re.compile(r"ZEPHYR_(?:LOAD|TEST|FUZZ|REAL_FUZZ|MCQ_FUZZ|DIALOGRPT|SERVICE)_\w*|"
                            r"ZEPHYR_(?:API_KEY|URL|HELM)|ZEPHYR_PORT_\d+_(?:TCP|UDP|SCTP)\w*")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each ZEPHYR_ variable that names no setting (a typo, `ZEPHYR_DRAIN_SECOND`, was ignored without a
    word, and the default served), with the setting it most likely meant."""
    settings = {f"ZEPHYR_{name.upper()}" for name in Settings.model_fields}
    lines = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads names in any case
        if not upper.startswith("ZEPHYR_") or upper in settings or TOOL_VARIABLES.fullmatch(upper):
            continue
        meant = difflib.get_close_matches(upper, settings, n=1, cutoff=0.8)
        lines.append(f"{name} is no setting and is ignored" + (f"; did you mean {meant[0]}?" if meant else ""))
    return lines


ROLES = ("student", "reviewer", "admin")
MAX_KEY_NAME_CHARS = 64


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
