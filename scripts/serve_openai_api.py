"""An OpenAI-compatible chat server (FastAPI + uvicorn) over the batching ``serving.Engine``.

    python scripts/serve_openai_api.py --model out/sft [--lora out/lora] [--port 8998]

Endpoints: ``POST /v1/chat/completions`` (streaming as SSE and not; ``logprobs`` /
``top_logprobs`` in OpenAI's chat format), ``POST /v1/completions``
(the legacy text API: ``echo`` and ``logprobs`` for lm-evaluation-harness's ``local-completions``
scoring), ``GET /v1/models``,
``GET /health`` (engine counters included). What MiniMind's server lacks and this one does:
``stream`` defaults to false as in the spec; streams end with ``data: [DONE]``; ``usage`` (and
``stream_options.include_usage``); strict request validation with OpenAI-style error bodies
``{"error": {"message", "type", "param", "code"}}`` (malformed JSON included); optional Bearer
auth; a bounded queue and body size; a loopback bind unless ``--host`` says otherwise;
concurrent requests decoded together; a disconnecting client's generation cancelled;
``<think>`` → ``reasoning_content`` and ``<tool_call>`` → ``tool_calls``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.generate import SamplingParams
from inference import load_for_inference
from model.precision import DTYPE_CHOICES
from serving.chat import AssistantParser, ParsedOutput, collect
from serving.engine import (Engine, EngineClosed, EngineOverloaded, Event, Failed, Finished,
                            TextDelta, TokenLogprobs)

log = logging.getLogger("serve_openai_api")

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


def _from_validation_error(err: ValidationError) -> APIError:
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


def sampling_params(req, max_new_tokens: int, tokenizer) -> SamplingParams:
    """The request's sampling fields (chat and completions spell them alike)."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    top_p = 1.0 if req.top_p is None else req.top_p
    # top_p -> 0 keeps only the most likely token: the greedy limit, not an error.
    temperature = 0.0 if top_p == 0 else (1.0 if req.temperature is None else req.temperature)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=req.top_k or 0, top_p=top_p or 1.0,
                          repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed,
                          stop_token_ids=stop_token_ids(tokenizer), stop_strings=stops)


def build_completion_prompts(req: CompletionRequest, tokenizer, context: int
                             ) -> list[tuple[list[int], SamplingParams]]:
    """Token ids (no chat template: a completion continues the raw text) and sampling per
    prompt. With echo, a prompt may fill the context (it is scored, then generation stops)."""
    out = []
    for i, prompt in enumerate(req.prompts):
        param = f"prompt[{i}]" if len(req.prompts) > 1 else "prompt"
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        if any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise APIError(400, f"{param}: token ids must be in [0, {tokenizer.vocab_size})",
                           param=param)
        scoring = bool(req.echo and req.logprobs is not None)
        if len(ids) > context or (len(ids) == context and not scoring):
            raise APIError(400, f"This model's maximum context length is {context} tokens; "
                           f"{param} has {len(ids)}", param=param,
                           code="context_length_exceeded")
        out.append((ids, sampling_params(req, min(req.max_tokens, context - len(ids)),
                                         tokenizer)))
    return out


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """``<|im_end|>`` ends a turn; ``<|endoftext|>`` ends a document (a base model's way)."""
    return tuple(dict.fromkeys((tokenizer.eos_id, tokenizer.pad_id)))


def build_prompt(req: ChatCompletionRequest, tokenizer, context: int
                 ) -> tuple[list[int], SamplingParams]:
    """Renders the chat template and maps the request onto ``SamplingParams``."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.use_tools else None
    try:
        text = tokenizer.apply_chat_template([m.for_template() for m in req.messages],
                                             tools=tools, add_generation_prompt=True,
                                             enable_thinking=req.thinking)
    except Exception as e:  # a template's raise_exception: the messages are at fault
        raise APIError(400, f"messages: {e}", param="messages") from None
    ids = tokenizer.encode(text)
    if len(ids) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens; the "
                       f"prompt has {len(ids)} (and at least one token must be generated)",
                       param="messages", code="context_length_exceeded")
    room = context - len(ids)
    wanted = req.max_completion_tokens or req.max_tokens or room
    return ids, sampling_params(req, min(wanted, room), tokenizer)


def _queue_sink(loop: asyncio.AbstractEventLoop,
                events: asyncio.Queue) -> Callable[[Event], None]:
    """For streaming: every event crosses into the event loop as it happens."""
    def sink(event: Event) -> None:  # runs on the engine thread
        loop.call_soon_threadsafe(events.put_nowait, event)
    return sink


def _collecting_sink(loop: asyncio.AbstractEventLoop, pieces: list[str],
                     outcome: asyncio.Future, logprobs: list | None = None
                     ) -> Callable[[Event], None]:
    """For whole responses: nobody reads the text before the end, so deltas (and log-prob
    events, into ``logprobs``) are only collected (a list append is atomic) and just the final
    event wakes the event loop."""
    def resolve(event: Event) -> None:
        if not outcome.done():
            outcome.set_result(event)

    def sink(event: Event) -> None:  # runs on the engine thread
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        elif isinstance(event, TokenLogprobs):
            if logprobs is not None:
                logprobs.append(event)
        else:
            loop.call_soon_threadsafe(resolve, event)
    return sink


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message
    can only be ``http.disconnect`` (the server sends it when the socket closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the app --------------------------------------------------------------------------------------

def create_app(engine: Engine, served_model_name: str, api_key: str | None = None,
               max_request_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app; the caller owns the engine (start it before serving, shut it down after)."""
    app = FastAPI(title="minimind-forge OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.engine = engine
    created = int(time.time())
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and wrong methods get the same error shape as everything else.
        return APIError(exc.status_code, str(exc.detail),
                        code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped",
                             "model": served_model_name, "engine": engine.stats_snapshot()},
                            status_code=200 if alive else 503)

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created,
                "owned_by": "minimind-forge", "max_model_len": engine.context_length}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        authorize(request)
        if model_id != served_model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model",
                           code="model_not_found")
        return model_card()

    async def read_request(request: Request, schema: type[_Strict] = ChatCompletionRequest):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_request_bytes:
            raise APIError(413, f"request body larger than {max_request_bytes} bytes")
        try:
            raw = await request.body()
        except ClientDisconnect:  # nobody to answer; 499 is what nginx logs for it
            raise APIError(499, "client closed the connection") from None
        if len(raw) > max_request_bytes:
            raise APIError(413, f"request body larger than {max_request_bytes} bytes")
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        except RecursionError:  # e.g. [[[[...]]]] 100,000 deep: the decoder recurses per level
            raise APIError(400, "the body is not valid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            req = schema.model_validate(obj)
        except ValidationError as e:
            raise _from_validation_error(e) from None
        if req.model != served_model_name:
            raise APIError(404, f"The model '{req.model}' does not exist (this server serves "
                           f"'{served_model_name}')", param="model", code="model_not_found")
        return req

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = await read_request(request)
        prompt_ids, params = build_prompt(req, tokenizer, engine.context_length)
        loop = asyncio.get_running_loop()
        if req.stream:
            events: asyncio.Queue[Event] = asyncio.Queue()
            sink = _queue_sink(loop, events)
        else:
            pieces: list[str] = []
            logprobs: list[TokenLogprobs] = []
            outcome: asyncio.Future = loop.create_future()
            sink = _collecting_sink(loop, pieces, outcome, logprobs)

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            handle = engine.submit(completion_id, prompt_ids, params, sink,
                                   logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        except EngineOverloaded as e:
            raise APIError(503, f"server overloaded: {e}; retry later", "server_error",
                           code="overloaded") from None
        except EngineClosed as e:
            raise APIError(503, str(e), "server_error") from None
        parser = AssistantParser(thinking=req.thinking, parse_tools=req.use_tools)
        reply = Reply(completion_id, served_model_name, req, tokenizer, params.stop_token_ids)
        if req.stream:
            return StreamingResponse(reply.sse(events, handle, parser),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await reply.whole(outcome, pieces, handle, parser, request, logprobs)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = await read_request(request, CompletionRequest)
        jobs = build_completion_prompts(req, tokenizer, engine.context_length)
        loop = asyncio.get_running_loop()
        reply = CompletionReply(f"cmpl-{uuid.uuid4().hex}", served_model_name, req, tokenizer)
        top_n = req.logprobs
        outcomes, handles = [], []
        try:
            if req.stream:
                events: asyncio.Queue[Event] = asyncio.Queue()
                ids, params = jobs[0]
                handle = engine.submit(reply.id, ids, params, _queue_sink(loop, events))
                return StreamingResponse(reply.sse(events, handle),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache",
                                                  "X-Accel-Buffering": "no"})
            for i, (ids, params) in enumerate(jobs):
                pieces: list[str] = []
                logprobs: list = []
                outcome: asyncio.Future = loop.create_future()
                handles.append(engine.submit(
                    f"{reply.id}-{i}", ids, params, _collecting_sink(loop, pieces, outcome,
                                                                     logprobs),
                    logprobs=top_n, prompt_logprobs=top_n if req.echo else None))
                outcomes.append((ids, pieces, logprobs, outcome))
        except EngineOverloaded as e:
            for h in handles:
                h.cancel()
            raise APIError(503, f"server overloaded: {e}; retry later", "server_error",
                           code="overloaded") from None
        except EngineClosed as e:
            raise APIError(503, str(e), "server_error") from None
        return await reply.whole(outcomes, handles, request)

    return app


class CompletionReply:
    """Turns the engine events of one ``/v1/completions`` request into its response: ``text``
    (the prompt first with ``echo``) and, with ``logprobs``, OpenAI's legacy ``{tokens,
    token_logprobs, top_logprobs, text_offset}`` over the echoed prompt and the completion
    (the first prompt token has no log-prob: null)."""

    def __init__(self, completion_id: str, model: str, req: CompletionRequest, tokenizer) -> None:
        self.id, self.model, self.req, self.tokenizer = completion_id, model, req, tokenizer
        self.created = int(time.time())

    def logprobs(self, events: list[TokenLogprobs], start_offset: int) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = start_offset
        for event in events:
            for tok, lp, top in event.entries:
                text = self.tokenizer.decode([tok])
                tokens.append(text)
                token_logprobs.append(lp)
                alternatives: dict[str, float] = {}
                for alt, alt_lp in top:  # two ids may decode alike: keep the likelier
                    key = self.tokenizer.decode([alt])
                    alternatives[key] = max(alt_lp, alternatives.get(key, float("-inf")))
                top_logprobs.append(alternatives if lp is not None else None)
                offsets.append(offset)
                offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def choice(self, index: int, ids: list[int], text: str, logprobs: list[TokenLogprobs],
               finished: Finished) -> dict:
        prompt_text = self.tokenizer.decode(ids) if self.req.echo else ""
        lp = None
        if self.req.logprobs is not None:
            lp = self.logprobs(logprobs, 0 if self.req.echo else len(prompt_text))
        return {"text": prompt_text + text, "index": index, "logprobs": lp,
                "finish_reason": finished.finish_reason}

    async def whole(self, outcomes: list, handles: list, request: Request) -> JSONResponse:
        gone = asyncio.ensure_future(_client_gone(request))
        futures = {o[3] for o in outcomes}
        try:
            pending = set(futures)
            while pending and not gone.done():
                _, pending = await asyncio.wait(pending | {gone},
                                                return_when=asyncio.FIRST_COMPLETED)
                pending.discard(gone)
            if not all(f.done() for f in futures):
                return JSONResponse({}, status_code=499)  # the client left
            choices, prompt_tokens, completion_tokens = [], 0, 0
            for i, (ids, pieces, logprobs, outcome) in enumerate(outcomes):
                event = outcome.result()
                if isinstance(event, Failed):
                    raise APIError(500, event.message, "server_error")
                choices.append(self.choice(i, ids, "".join(pieces), logprobs, event))
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
            return JSONResponse({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}})
        finally:
            gone.cancel()
            for h in handles:
                h.cancel()

    def chunk(self, text: str, finish_reason: str | None = None) -> str:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"text": text, "index": 0, "logprobs": None,
                             "finish_reason": finish_reason}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self, events: asyncio.Queue, handle) -> AsyncIterator[str]:
        try:
            while True:
                event = await events.get()
                if isinstance(event, TextDelta):
                    yield self.chunk(event.text)
                elif isinstance(event, Failed):
                    err = APIError(500, event.message, "server_error").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                elif isinstance(event, Finished):
                    yield self.chunk("", event.finish_reason)
                    if self.req.stream_options and self.req.stream_options.include_usage:
                        usage = {"prompt_tokens": event.prompt_tokens,
                                 "completion_tokens": event.completion_tokens,
                                 "total_tokens": event.prompt_tokens + event.completion_tokens}
                        body = {"id": self.id, "object": "text_completion",
                                "created": self.created, "model": self.model, "choices": [],
                                "usage": usage}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()


class Reply:
    """Turns one request's engine events into an OpenAI response (whole or SSE).

    With ``logprobs``, ``choices[0].logprobs.content`` lists every generated token but the stop
    token (reasoning and tool-call markup included: they are generated text too) as OpenAI's
    ``{token, logprob, bytes, top_logprobs}``, log-probs of the raw model distribution (before
    temperature and top-p). Streamed, each chunk carries the entries of the tokens whose text
    it is the first to show.
    """

    def __init__(self, completion_id: str, model: str, req: ChatCompletionRequest, tokenizer=None,
                 stop_ids: Sequence[int] = ()) -> None:
        self.id, self.model, self.req = completion_id, model, req
        self.tokenizer, self.stop_ids = tokenizer, frozenset(stop_ids)
        self.created = int(time.time())

    def token_entry(self, tid: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(tid)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}

    def logprob_content(self, events: Sequence[TokenLogprobs]) -> list[dict]:
        return [{**self.token_entry(tok, lp),
                 "top_logprobs": [self.token_entry(alt, alt_lp) for alt, alt_lp in top]}
                for event in events for tok, lp, top in event.entries if tok not in self.stop_ids]

    def logprobs_field(self, events: Sequence[TokenLogprobs]) -> dict | None:
        return {"content": self.logprob_content(events), "refusal": None} if self.req.logprobs else None

    def take_logprobs(self, pending: list[TokenLogprobs]) -> dict | None:
        """A chunk's ``logprobs``: the pending tokens' entries (emptying ``pending``), or None
        when there are none (every pending token was a stop token)."""
        content = self.logprob_content(pending)
        pending.clear()
        return {"content": content, "refusal": None} if content else None

    @staticmethod
    def finish_reason(finished: Finished, out: ParsedOutput) -> str:
        return "tool_calls" if finished.finish_reason == "stop" and out.tool_calls else (
            finished.finish_reason)

    @staticmethod
    def usage(finished: Finished) -> dict:
        return {"prompt_tokens": finished.prompt_tokens,
                "completion_tokens": finished.completion_tokens,
                "total_tokens": finished.prompt_tokens + finished.completion_tokens}

    async def whole(self, outcome: asyncio.Future, pieces: list[str], handle,
                    parser: AssistantParser, request: Request,
                    logprobs: Sequence[TokenLogprobs] = ()) -> JSONResponse:
        """Waits for the end of generation, or for the client to hang up (then cancels it)."""
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({outcome, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not outcome.done():  # the client left; nobody will read a response
                return JSONResponse({}, status_code=499)
            event = outcome.result()
            if isinstance(event, Failed):
                raise APIError(500, event.message, "server_error")
            out = ParsedOutput()
            collect(parser.push("".join(pieces)), out)
            collect(parser.finish(), out)
            return JSONResponse(self.completion(out, event, logprobs))
        finally:
            gone.cancel()
            handle.cancel()  # a no-op once finished; stops decoding if we leave early

    def completion(self, out: ParsedOutput, finished: Finished,
                   logprobs: Sequence[TokenLogprobs] = ()) -> dict:
        message: dict[str, Any] = {"role": "assistant",
                                   "content": out.content or (None if out.tool_calls else "")}
        if out.reasoning_content is not None:
            message["reasoning_content"] = out.reasoning_content
        if out.tool_calls:
            message["tool_calls"] = out.tool_calls
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": message,
                             "logprobs": self.logprobs_field(logprobs),
                             "finish_reason": self.finish_reason(finished, out)}],
                "usage": self.usage(finished)}

    def chunk(self, delta: dict, finish_reason: str | None = None,
              logprobs: list[TokenLogprobs] | None = None) -> str:
        """One SSE chunk; ``logprobs`` (when given) is emptied into it."""
        lp = self.take_logprobs(logprobs) if logprobs else None
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                                "created": self.created, "model": self.model,
                                "system_fingerprint": None,
                                "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                             "finish_reason": finish_reason}]}
        if self.include_usage:
            body["usage"] = None  # the spec: null on every chunk but the last
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    def delta_chunks(self, parsed: list, out: ParsedOutput,
                     logprobs: list[TokenLogprobs] | None = None) -> list[str]:
        chunks = []
        for kind, value in parsed:
            if kind == "reasoning":
                chunks.append(self.chunk({"reasoning_content": value}, logprobs=logprobs))
            elif kind == "content":
                chunks.append(self.chunk({"content": value}, logprobs=logprobs))
            else:
                call = dict(value, index=len(out.tool_calls))
                chunks.append(self.chunk({"tool_calls": [call]}, logprobs=logprobs))
            collect([(kind, value)], out)
        return chunks

    async def sse(self, events: asyncio.Queue, handle, parser: AssistantParser
                  ) -> AsyncIterator[str]:
        # On a client disconnect Starlette cancels this generator at its current await (uvicorn
        # reports ASGI spec 2.3, so StreamingResponse listens for http.disconnect); `finally`
        # then cancels the engine request, which stops its row within one decoding step.
        out = ParsedOutput()
        pending: list[TokenLogprobs] = []   # tokens whose text no chunk has shown yet
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if isinstance(event, TokenLogprobs):
                    pending.append(event)
                elif isinstance(event, TextDelta):
                    for c in self.delta_chunks(parser.push(event.text), out, pending):
                        yield c
                elif isinstance(event, Failed):
                    err = APIError(500, event.message, "server_error").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                else:
                    for c in self.delta_chunks(parser.finish(), out, pending):
                        yield c
                    yield self.chunk({}, self.finish_reason(event, out), pending)
                    if self.include_usage:
                        usage = {"id": self.id, "object": "chat.completion.chunk",
                                 "created": self.created, "model": self.model,
                                 "system_fingerprint": None, "choices": [],
                                 "usage": self.usage(event)}
                        yield f"data: {json.dumps(usage)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()


# -- command line ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + "
                   "model.safetensors; its own tokenizer files if present)")
    p.add_argument("--lora", default=None, help="LoRA adapter folder, merged at load")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 where the hardware runs it natively, else fp32 (fp16 on a GPU "
                        "without bf16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if any)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="requests decoded together (continuous batching: slots of the cache)")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens prefilled between two decode steps (bounds the stall a "
                        "new prompt causes to running streams)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the decode step (auto: on CUDA; on CPU it costs ~1 min "
                        "per batch bucket; see README)")
    p.add_argument("--max-pending", type=int, default=256, help="queued requests before 503")
    p.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger bodies: 413")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    model, tokenizer = load_for_inference(args.model, args.lora, args.device, args.dtype)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size,
                    max_pending=args.max_pending, prefill_chunk=args.prefill_chunk,
                    compile=None if args.compile == "auto" else args.compile == "on").start()
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, name, api_key=args.api_key,
                     max_request_bytes=args.max_request_bytes)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
