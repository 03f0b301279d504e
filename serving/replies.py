"""OpenAI responses built from one request's engine events, whole or streamed as SSE.

Scope: ``Reply`` for ``/v1/chat/completions`` (assistant text parsed into ``content``,
``reasoning_content`` and ``tool_calls``; OpenAI chat ``logprobs``) and ``CompletionReply`` for
the legacy ``/v1/completions`` (``echo``, legacy ``logprobs``). Both cancel their engine request
when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse

from serving.chat import AssistantParser, ParsedOutput, collect
from serving.engine import Failed, Finished, TextDelta, TokenLogprobs
from serving.schema import APIError, ChatCompletionRequest, CompletionRequest


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message
    can only be ``http.disconnect`` (the server sends it when the socket closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
            if self.req.parallel_tool_calls is False:
                out.tool_calls = out.tool_calls[:1]
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
                if self.req.parallel_tool_calls is False and out.tool_calls:
                    continue  # OpenAI: at most one call per reply; decoding is not constrained,
                    # so the reply's later calls are dropped (as in the whole response)
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
