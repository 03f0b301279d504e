"""An OpenAI-compatible chat API (FastAPI) over the batching ``serving.Engine``.

Endpoints: ``POST /v1/chat/completions`` (streaming as SSE and not; ``logprobs`` /
``top_logprobs`` in OpenAI's chat format), ``POST /v1/completions``
(the legacy text API: ``echo`` and ``logprobs`` for lm-evaluation-harness's ``local-completions``
scoring), ``GET /v1/models``,
``GET /health`` (engine counters included). What MiniMind's server lacks and this one does:
``stream`` defaults to false as in the spec; streams end with ``data: [DONE]``; ``usage`` (and
``stream_options.include_usage``); strict request validation with OpenAI-style error bodies
``{"error": {"message", "type", "param", "code"}}`` (malformed JSON included); optional Bearer
auth; a bounded queue and body size; concurrent requests decoded together; a disconnecting
client's generation cancelled; ``<think>`` → ``reasoning_content`` and ``<tool_call>`` →
``tool_calls``.

Scope: ``create_app`` and the mapping of a validated request onto engine input (prompt ids and
``SamplingParams``). The request schema is ``serving.schema``, the responses ``serving.replies``;
``scripts/serve_openai_api.py`` loads a model and runs this app under uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.generate import SamplingParams
from serving.chat import AssistantParser
from serving.engine import Engine, EngineClosed, EngineOverloaded, Event, TextDelta, TokenLogprobs
from serving.replies import CompletionReply, Reply
from serving.schema import APIError, ChatCompletionRequest, CompletionRequest, from_validation_error

log = logging.getLogger("serve_openai_api")


# -- from a request to engine input ---------------------------------------------------------------

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


# -- engine events into the event loop -----------------------------------------------------------

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

    async def read_request(request: Request, schema: type[BaseModel] = ChatCompletionRequest):
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
            raise from_validation_error(e) from None
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
