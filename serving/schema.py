"""The OpenAI wire format: request bodies (pydantic, strict) and error bodies.

Scope: what ``serving.openai_api`` accepts and refuses, before anything reaches the engine.
Requests are validated strictly (``"0.5"`` is not a number, ``1.0`` is not an int, as in
OpenAI's API); known but unsupported fields are refused with a message; errors are answered as
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` through ``APIError``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # the OpenAI limit
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


# -- errors ---------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after",
              "function-before", "function-wrap", "literal"}


def _param_path(loc: tuple) -> str | None:
    """``("messages", 0, "role")`` → ``"messages[0].role"`` (pydantic's union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.split("[")[0].lower() in _TYPE_TAGS or not part.isidentifier():
            break  # past the field path: a union member or validator tag
        else:
            out += f".{part}" if out else part
    return out or None


def from_validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the offending field."""
    first = err.errors(include_url=False)[0]
    param = _param_path(tuple(first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


# -- the request schema ---------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1.0 is not an int, as in OpenAI's API. Unknown fields
    # are ignored (clients send many optional ones), but known unsupported ones are refused below.
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported (text only)")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


class ToolCallFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str  # a JSON string, as OpenAI sends it


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _needs_content(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def for_template(self) -> dict[str, Any]:
        """The dict our chat template expects (developer = system; text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content)
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content or ""}
        if self.tool_calls:
            msg["tool_calls"] = [{"type": "function", "function": c.function.model_dump()}
                                 for c in self.tool_calls]
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        return msg


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool | None = None


MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit for chat; lm-eval asks for 1)


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # None: the spec's default, 1
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    user: str | None = None
    # Extensions (vLLM / SGLang spell them the same; the openai client sends them via extra_body).
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    enable_thinking: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stop

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            raise ValueError("tool_choice: only 'auto' and 'none' are supported "
                             "(decoding is not constrained)")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty / frequency_penalty are not supported; "
                             "use repetition_penalty")
        return self

    @property
    def thinking(self) -> bool:
        if self.enable_thinking is not None:
            return self.enable_thinking
        kwargs = self.chat_template_kwargs
        return bool(kwargs and kwargs.enable_thinking)

    @property
    def use_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(_Strict):
    """The legacy ``/v1/completions`` body, as lm-evaluation-harness's ``local-completions`` and
    the openai client's ``completions.create`` send it."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # the spec's default; 0 = score the prompt only
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    n: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)

    @field_validator("n", "best_of")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        return ChatCompletionRequest._only_one_choice(n)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        return ChatCompletionRequest._stops(stop)

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.stream and (self.logprobs is not None or self.echo or len(self.prompts) > 1):
            raise ValueError("stream: only one prompt, without echo and logprobs, can be "
                             "streamed")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty / frequency_penalty are not supported; "
                             "use repetition_penalty")
        return self

    @property
    def prompts(self) -> list:
        """One entry per choice: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)
