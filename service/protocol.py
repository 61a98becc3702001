"""Request and response models at the HTTP boundary (OpenAI's chat protocol, and our /mcq)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictStr, field_validator, model_validator

from zephyr import mcq

# Fields of OpenAI's chat API this server does not implement: a 400 that names them, never ignored.
UNSUPPORTED_CHAT_FIELDS = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
    "logit_bias", "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "store",
    "metadata", "service_tier", "suffix", "echo", "best_of", "verbosity",
)

# And of its legacy completions API.
UNSUPPORTED_COMPLETION_FIELDS = ("best_of", "suffix", "logit_bias")

# Values of those fields that ask for nothing this server does not do (what OpenAI's and vLLM's clients send
# by default): taken and dropped, as null is for every one of them. Compared as JSON (`true` is not `1`).
HARMLESS_VALUES: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),  # one candidate per answer: what is done anyway
    "store": (False,),
    "parallel_tool_calls": (True, False),  # about tool calls, and no request here has tools
    "tool_choice": ("none",),
    "logit_bias": ({},),
    "metadata": ({},),  # no tags to keep
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "echo": (False,),  # the chat's (vLLM's); /v1/completions implements its own
}


INT32_MAX = 2**31 - 1  # an SQL INTEGER column's largest value on PostgreSQL
INT64 = (-(2**63), 2**63 - 1)  # vLLM's bound on `seed` (a torch.long); ids and seeds past it are refused here


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


# Explicit bounds on every text and list a request holds. They are the schema's outer walls (a default body is
# 1 MB anyway); what a prompt may really hold is ZEPHYR_MAX_PROMPT_CHARS and the context, checked per request.
MAX_TEXT_CHARS = 100_000_000  # ZEPHYR_MAX_BODY_BYTES's own bound
MAX_TOKEN_IDS = 1_048_576  # ZEPHYR_MAX_MODEL_LEN's
MAX_PARTS = 1024
Text = Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)]

# Far more than any request of ours needs (a chat message part is 4 deep); a deeper body is refused by name.
MAX_JSON_DEPTH = 32


def text_problem(value: Any, where: str = "") -> str | None:
    """The first string in a JSON value that cannot be text in the log (a lone UTF-16 surrogate has no UTF-8
    form; PostgreSQL's text and JSON refuse NUL), named by its path: `messages[0].content`; or the first place
    the value nests deeper than MAX_JSON_DEPTH. Walked with a stack of its own, so no depth the JSON parser
    accepts can overflow Python's; a place is kept as a link to its parent and spelled out only for the problem
    it names (spelling every place out would copy a long key once for each item under it)."""
    # Only containers and strings with a problem go on the stack, and a list of plain numbers or of good strings is
    # passed over in one C-level pass: the walk runs on the event loop before any bound refuses the body (a 1 MB
    # list of token ids took 0.4 s item by item).
    if isinstance(value, str):
        return _text_problem(value, None, where)
    # (container, or a string known to be bad; place; depth). A place is (parent place, key or index), None at the top.
    stack: list[tuple[Any, tuple | None, int]] = [(value, None, 0)] if isinstance(value, dict | list) else []
    while stack:
        item, place, depth = stack.pop()
        if isinstance(item, str):
            return _text_problem(item, place, where)
        if depth >= MAX_JSON_DEPTH:
            return (f"`{_place_name(place, where)}` nests deeper than {MAX_JSON_DEPTH} levels of objects and lists; "
                    "flatten it")
        if isinstance(item, list):
            kinds = set(map(type, item))
            if kinds <= _SCALARS or (kinds == {str} and not _UNSTORABLE.search("\n".join(item))):
                continue
            pairs: Any = enumerate(item)
        else:
            pairs = item.items()
        later = []
        for step, child in pairs:
            if isinstance(step, str) and _UNSTORABLE.search(step):  # a key: named before its value
                later.append((step, (place, step), depth + 1))
            if isinstance(child, dict | list) or (isinstance(child, str) and _UNSTORABLE.search(child)):
                later.append((child, (place, step), depth + 1))
        stack.extend(reversed(later))  # depth first, in order: the first problem is the one named
    return None


_SCALARS = {int, float, bool, type(None)}


def _text_problem(text: str, place: tuple | None, where: str) -> str | None:
    if (found := _UNSTORABLE.search(text)) is None:
        return None
    name = _place_name(place, where)
    if found.group() == "\x00":
        return f"`{name}` contains a NUL character (\\u0000); remove it"
    return (f"`{name}` contains a lone UTF-16 surrogate (U+{ord(found.group()):04X}), which is not valid "
            "Unicode; send well-formed text")


def _place_name(place: tuple | None, where: str) -> str:
    steps: list[str | int] = []
    while place is not None:
        place, step = place
        steps.append(step)
    name = where
    for step in reversed(steps):
        if isinstance(step, int):
            name += f"[{step}]"
        else:
            name = _UNSTORABLE.sub("?", f"{name}.{step}" if name else step)
    return name or "body"


class Strict(BaseModel):
    """Unknown fields are refused, numbers must be JSON numbers (not "2" or true), and every string must be
    text the log can keep."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _well_formed_text(cls, data: Any) -> Any:
        if (problem := text_problem(data)) is not None:
            raise ValueError(problem)
        return data


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


_HARMLESS_JSON = {name: {_as_json(v) for v in values} for name, values in HARMLESS_VALUES.items()}


def reject_unsupported(data: Any, fields: tuple[str, ...]) -> Any:
    """Refuses the unsupported `fields` a request sets; one that is null, or holds a value that asks for nothing
    (HARMLESS_VALUES), is dropped instead."""
    if not isinstance(data, dict):
        return data
    for name in fields:
        if name not in data or data[name] is None:
            continue
        # text_problem first: it bounds the depth, and json.dumps recurses (a value nested as deep as the parser
        # takes would exhaust Python's stack: a 500).
        if (problem := text_problem(data[name], name)) is not None:
            raise ValueError(problem)
        if _as_json(data[name]) not in _HARMLESS_JSON.get(name, ()):
            raise ValueError(f"`{name}` is not supported by this server; remove it from the request")
    return {key: value for key, value in data.items() if key not in fields}


class NullIsUnset(Strict):
    """OpenAI's request fields that have a default may be sent as null, meaning "not sent": the default (the
    `openai` client and others send explicit nulls). A required field stays required; the schema says null is
    taken."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if not (value is None and key in fields and not fields[key].is_required())}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler(core_schema)
        properties = handler.resolve_ref_schema(schema).get("properties", {})
        for name, field in cls.model_fields.items():
            prop = properties.get(name)
            if field.is_required() or prop is None or _nullable(prop):
                continue
            outer = {key: prop[key] for key in ("title", "description", "default") if key in prop}
            inner = {key: value for key, value in prop.items() if key not in outer}
            properties[name] = {"anyOf": [inner, {"type": "null"}], **outer}
        return schema


def _nullable(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(_nullable(branch) for branch in prop.get("anyOf", ()))


class TextPart(Strict):
    type: Literal["text"]
    text: Text


# What the official client sends back when a reply is appended to the conversation as it came
# (`messages.append(response.choices[0].message)`): fields of an assistant message this server always sends empty.
ECHOED_EMPTY_FIELDS = ("refusal", "annotations", "audio", "tool_calls", "function_call",
                       "parsed")  # the client's .parse() and .stream() helpers add `parsed`


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_PARTS)]
    name: str | None = Field(default=None, max_length=64, description=(
        "accepted as OpenAI's API does; the chat template does not read it"))

    @model_validator(mode="before")
    @classmethod
    def _explain_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("role") in ("tool", "function"):
                raise ValueError(f"role `{data['role']}` is not supported (no tool calling on this server)")
            if echoed := [k for k in ECHOED_EMPTY_FIELDS if k in data]:
                if filled := [k for k in echoed if data[k] not in (None, [], {}, "")]:
                    raise ValueError(f"`{filled[0]}` is not supported (no tool calling, audio or refusals on this "
                                     "server); send it empty or leave it out")
                data = {k: v for k, v in data.items() if k not in echoed}
            content = data.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") not in (None, "text"):
                        raise ValueError(f"content part type `{part.get('type')}` is not supported; send text only")
        return data

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins them: parts stay apart


class StreamOptions(NullIsUnset):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool = Field(default=False, description=(
        "accepted as OpenAI's API does (the current client sends it); its random padding is never added here"))
    continuous_usage_stats: StrictBool = Field(default=False, description=(
        "Not supported (only false): the usage arrives in the last chunk, with `include_usage`"))

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_running_usage(cls, value: bool) -> bool:
        if value:
            raise ValueError("not supported; the usage arrives in the last chunk with include_usage")
        return value


class SamplingRequest(NullIsUnset):
    """What the chat and the legacy completions request share: the model, OpenAI's sampling parameters and vLLM's
    extras (as `vllm serve` takes them, what `vllm bench serve` sends, with the bounds vLLM's SamplingParams
    checks; token ids are checked against the served tokenizer)."""

    model: StrictStr | None = Field(default=None, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False, description=(
        "unset: 1 on /v1/completions; on a chat the server's ZEPHYR_CHAT_TEMPERATURE (0.3 by default)"))
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False, description=(
        "unset: 1 on /v1/completions; on a chat the server's ZEPHYR_CHAT_TOP_P (0.9 by default)"))
    n: int = Field(default=1, ge=1, le=1024)
    stop: StrictStr | list[StrictStr] | None = Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    user: StrictStr | None = Field(default=None, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1, description="0 or -1: off")
    min_p: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float = Field(default=1.0, gt=0, le=1e6, allow_inf_nan=False)
    ignore_eos: StrictBool = False
    min_tokens: int = Field(default=0, ge=0, le=INT64[1])
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(default=None, max_length=64)
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True

    @property
    def answer_limit(self) -> int | None:
        """The most tokens asked for in one answer (None: as many as the context leaves)."""
        raise NotImplementedError

    @property
    def answer_limit_defaulted(self) -> bool:
        """Whether `answer_limit` is a default the client never sent (messages about it say so)."""
        return False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, temperature: float = 1.0, top_p: float = 1.0) -> dict[str, Any]:
        """service.engine.GenParams's fields that these parameters set alike on every route (the token ids of
        `stop_token_ids` still need the tokenizer's check); `temperature` and `top_p` where the request sets none
        (OpenAI's 1.0 unless the route has its own)."""
        return dict(
            temperature=temperature if self.temperature is None else self.temperature,
            top_p=top_p if self.top_p is None else self.top_p,
            n=self.n, stop=self.stop, seed=self.seed, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, top_k=self.top_k or 0, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    @model_validator(mode="after")
    def _consistent_sampling(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed with `stream: true`")
        asked = self.answer_limit
        if asked is not None and self.min_tokens > asked:
            raise ValueError(f"`min_tokens` ({self.min_tokens}) is more than the answer's limit ({asked}"
                             f"{', the default `max_tokens`' if self.answer_limit_defaulted else ''})")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("`stop` takes up to 4 non-empty strings of at most 256 characters")
        return stops


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1, le=INT64[1])
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64[1])
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    safety_identifier: StrictStr | None = Field(default=None, max_length=256, description=(
        "OpenAI's successor of `user` (the client's id of the person asking): logged as `user` where none is sent"))
    prompt_cache_key: StrictStr | None = Field(default=None, max_length=256, description=(
        "accepted as OpenAI's API does, and not needed: vLLM's prefix cache finds a shared prompt start by itself"))

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return reject_unsupported(data, UNSUPPORTED_CHAT_FIELDS)

    @model_validator(mode="after")
    def _user_by_its_new_name(self) -> ChatCompletionRequest:
        if self.user is None and self.safety_identifier is not None:
            self.user = self.safety_identifier
        return self

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("`messages` must contain at least one user message")
        return self


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on the legacy completions' `logprobs`
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class CompletionRequest(SamplingRequest):
    """OpenAI's legacy completions (`POST /v1/completions`): a raw prompt continued, without the chat template,
    as lm-eval's `local-completions` model sends it for log-likelihood tasks (`echo: true`, `logprobs: 1`)."""

    prompt: (Text | Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS)]
             | Annotated[list[Text], Field(max_length=MAX_PARTS)]
             | Annotated[list[Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS)]], Field(max_length=MAX_PARTS)]
             ) = Field(description=(
        "The text to continue, or its token ids; a list holding one such prompt is taken too (one prompt a "
        "request)"))
    max_tokens: int | None = Field(default=16, ge=0, le=INT64[1], description=(
        "Tokens to generate (OpenAI's default, 16); 0 with `echo` scores the prompt only"))
    echo: StrictBool = Field(default=False, description="Return the prompt before the completion (and, with "
                             "`logprobs`, the prompt tokens' log-probabilities: the first is null)")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS, description=(
        "Log-probabilities of the chosen tokens and of this many most likely ones at each position"))

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return reject_unsupported(data, UNSUPPORTED_COMPLETION_FIELDS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > 1 and all(isinstance(item, str | list) for item in value):
            raise ValueError(f"`prompt` holds {len(value)} prompts; this server takes one a request: send each in a "
                             "request of its own")
        return value

    @field_validator("prompt")
    @classmethod
    def _unwrapped(cls, value: Any) -> Any:
        # A list holding one prompt is unwrapped after validation, so an error inside it is named where the client
        # put it (`prompt[0][1]`), not where the unwrapped prompt has it.
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            value = value[0]
        if not value:
            raise ValueError("`prompt` is empty; send the text (or the token ids) to continue")
        return value

    @property
    def answer_limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens

    @property
    def answer_limit_defaulted(self) -> bool:
        return "max_tokens" not in self.model_fields_set or self.max_tokens is None


MCQMethod = Literal[mcq.METHODS]  # zephyr.mcq names the methods once


class MCQRequest(Strict):
    question: Text
    # Any, not str: a number or null among the options gets mcq's own message naming it.
    options: (Annotated[list[Any], Field(max_length=MAX_PARTS)]
              | Annotated[dict[str, Any], Field(max_length=MAX_PARTS)]) = Field(
        description="2-10 option texts, as a list or keyed by letter")
    support: Text | None = Field(default=None, description="A passage the question is about, shown first")
    method: MCQMethod = Field(default="auto", description=(
        "letter: one constrained letter token; cloze: each option's text scored as the question's continuation; "
        "explain: reasoning, then the letter; auto: what `zephyr eval calibrate` chose for the served model "
        "(cloze when it has no record)"))
    explain: StrictBool = Field(default=False, description="Same as method `explain` (kept for older clients)")
    min_confidence: StrictFloat | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False, description=(
        "Below this probability of the best option the answer is null and `abstained` is true"))
    model: StrictStr | None = Field(default=None, max_length=256)
    user: StrictStr | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _one_method(self) -> MCQRequest:
        if self.explain and self.method not in ("auto", "explain"):
            raise ValueError(f"`explain` is true, which asks for reasoning, and method `{self.method}` does none; "
                             "send `method: explain`, or drop `explain`")
        return self

    @property
    def resolved_method(self) -> str:
        return "explain" if self.explain else self.method


class MCQBatchRequest(Strict):
    questions: list[MCQRequest] = Field(min_length=1, max_length=1024, description="At most ZEPHYR_MAX_MCQ_BATCH")
    model: StrictStr | None = Field(default=None, max_length=256)


class ClozeScores(BaseModel):
    loglikelihood: dict[str, float] = Field(
        description="Each option text's summed log-likelihood after the question (lm-eval acc), and after the "
                    "calibration record's solved examples when the model has a record that names some")
    per_char: dict[str, float] = Field(description="The same per character of the option (lm-eval acc_norm)")
    answer_prior: dict[str, float] | None = Field(
        None, description="Each option text's log-likelihood after the calibration record's answer cue (such as "
                          "'Question: What is the answer?\\nAnswer:') without the question, when the method reads it "
                          "(cloze_pmi): how likely the text is on its own")


class MCQResponse(BaseModel):
    id: str
    answer: str | None = Field(description="The chosen option's letter; null when the tutor abstained")
    option: str | None
    probabilities: dict[str, float] = Field(description="Over exactly the option letters, summing to 1")
    confidence: float = Field(description="The highest option probability")
    abstained: bool = False
    method: str = Field(description="What answered: letter, cloze, explain, or what `auto` resolved to for this "
                        f"model: {', '.join(mcq.AUTO_METHODS)}")
    calibrated: bool = Field(description=("Whether a temperature, combination or sharpness fitted on the model's "
                                          "validation questions scaled the probabilities (the record's "
                                          "demonstrations alone do not count)"))
    cloze: ClozeScores | None = None
    explanation: str | None = None
    model: str


class MCQBatchResponse(BaseModel):
    id: str
    model: str
    results: list[MCQResponse]


# Responses of the OpenAI-compatible routes ------------------------------------------------------------------
# Shaped as OpenAI defines them (and vLLM's vllm/entrypoints/openai protocol models), checked against OpenAI's
# published OpenAPI document by tests/unit/test_openai_schema.py: field names and order are the wire format the
# `openai` client parses, so change neither. Nulls are sent, not left out (`logprobs: null`, `refusal: null`);
# the fields left out are a stream delta's absent `role`/`content`, `usage` in every chunk but the usage chunk
# (`stream_options.include_usage`), and `system_fingerprint` (a string or absent in OpenAI's schema; nothing
# here fingerprints the backend).


class OpenAIResponse(BaseModel):
    """A response model: fields with defaults are sent all the same, so the schema marks them required."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class TopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes")


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The most likely tokens at this position (`top_logprobs`)")


class ChoiceLogprobs(OpenAIResponse):
    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = Field(None, description="Always null: this tutor sends no refusals")


class ChatMessageOut(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = Field(None, description="Always null: this tutor sends no refusals")


class ChatCompletionChoice(OpenAIResponse):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = Field(description="stop, length, or content_filter when the safety guard answered "
                                       "instead of the model or stopped its answer at a flagged sentence; null if the "
                                       "generation was cut off")


class Usage(OpenAIResponse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


def _absent(value: Any) -> bool:
    return value is None


class ChatDelta(BaseModel):
    """What a stream chunk adds to a choice: the role in the first chunk, then content; absent keys are left
    out ({} in a chunk that only finishes a choice)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_absent)
    content: str | None = Field(default=None, exclude_if=_absent)


class ChatCompletionChunkChoice(OpenAIResponse):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIResponse):
    """One server-sent event of a streamed chat completion (`data: <this JSON>`; the stream ends with
    `data: [DONE]`). With `stream_options.include_usage`, one more chunk, with no choices, carries the usage
    before [DONE]; no other chunk has a `usage` key."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_absent)


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zephyr"
    parent: str | None = Field(description="The registry entry this model was made from (null for a base)")
    method: str = Field(description="How it was made: base, sft, dpo, kto, rs, gptq, awq, w8a8, ...")
    max_model_len: int
    revision: str = Field(description="Which weights of this name: the bundled base model's digest, else when its "
                          "registry entry was made (review pairs record it, and `eval gate --reviews` matches it)")
    mcq_calibrated_at: str | None = Field(default=None, description=(
        "When the /mcq calibration record this server answers `auto` with was fitted (null: it has none and "
        "answers plain cloze); `eval run --server` records it, and the gate refuses figures of a record since "
        "replaced"))


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(OpenAIResponse):
    """Per token of the choice's `text` (the prompt's first when echoed): its text, log-probability, the most
    likely tokens there (the chosen one included) and where it starts in `text`. The prompt's first token has
    null for both, as with OpenAI: nothing precedes it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(OpenAIResponse):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = Field(description="stop, length, or content_filter when the safety guard answered "
                                       "instead of the model or stopped its answer at a flagged sentence; null in "
                                       "stream chunks until the choice ends")


class CompletionResponse(OpenAIResponse):
    """A legacy completion; streamed, each server-sent event is one of these (OpenAI uses one shape for both),
    ending with `data: [DONE]`. `usage` is in the response, and in a stream only in the last chunk, which has
    no choices (with `stream_options.include_usage`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_absent)
