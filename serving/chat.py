"""Splitting raw assistant text into reasoning, content and OpenAI tool calls.

Our chat template (see ``model/tokenizer/tokenizer_config.json``) renders an assistant turn as::

    <think>\\n{reasoning}\\n</think>\\n\\n{content}
    <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>

and the generation prompt ends either inside the think block (``<think>\\n``, thinking on) or after
an empty one (thinking off). So the model's output starts in *reasoning* when thinking is on and
in *content* otherwise; a model that opens ``<think>`` on its own at the very start is honoured
too. ``<tool_call>{json}</tool_call>`` blocks become OpenAI ``tool_calls`` (ids ``call_…``,
``arguments`` as a JSON string) when the request declared tools; a block whose JSON does not
parse, or one left open when generation ended, is given back as plain content so no text is lost.

``AssistantParser`` works incrementally (for SSE streaming): it holds back a text tail that could
still become a tag, and whitespace at segment edges (the template's newlines around tags), and
releases it once the next characters decide. ``parse_assistant_output`` runs the same parser over a
whole text, so a streamed reply concatenates to exactly the non-streamed one.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

EventKind = Literal["reasoning", "content", "tool_call"]
# ("reasoning" | "content", text) or ("tool_call", OpenAI tool-call dict)
ParseEvent = tuple[EventKind, Any]


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id (``call_`` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_call(body: str, call_id: str) -> dict[str, Any] | None:
    """The OpenAI ``tool_calls`` entry for one ``<tool_call>`` body, or None if it is not one.

    The body must be a JSON object with a non-empty string ``name``; ``arguments`` (or Qwen's
    older ``parameters``) may be an object (serialised back to a JSON string, as OpenAI sends
    it) or already a string; absent means ``{}``.
    """
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, dict):
        arguments = json.dumps(args, ensure_ascii=False)
    elif isinstance(args, str):
        arguments = args
    else:
        return None
    return {"id": call_id, "type": "function",
            "function": {"name": obj["name"], "arguments": arguments}}


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class AssistantParser:
    """Incremental parser: ``push(text) -> events``, then ``finish() -> events``.

    Events come in output order: ``("reasoning", str)``, ``("content", str)`` and
    ``("tool_call", dict)``. Whitespace at the start and end of each reasoning or content segment
    is dropped (the template puts newlines around every tag); whitespace inside is kept.
    """

    def __init__(self, thinking: bool = False, parse_tools: bool = False,
                 id_factory: Callable[[], str] = new_tool_call_id) -> None:
        # "start": content not begun and a leading <think> is still possible.
        self._mode: Literal["start", "reasoning", "content", "tool"] = (
            "reasoning" if thinking else "start")
        self._parse_tools = parse_tools
        self._id_factory = id_factory
        self._buf = ""  # text not yet classified
        self._pending_ws = ""  # trailing whitespace of the current segment, held back
        self._segment_started = False  # a non-whitespace char of this segment was emitted
        self.tool_calls: list[dict[str, Any]] = []
        self._finished = False

    # -- segment output with edge-whitespace trimming ------------------------------------------

    def _emit(self, kind: EventKind, text: str, out: list[ParseEvent]) -> None:
        if not self._segment_started:
            text = text.lstrip()
        if not text:
            return
        body = text.rstrip()
        if not body:  # all whitespace, inside the segment: keep it pending
            self._pending_ws += text
            return
        out.append((kind, self._pending_ws + body))
        self._pending_ws = text[len(body):]
        self._segment_started = True

    def _new_segment(self) -> None:
        self._pending_ws = ""
        self._segment_started = False

    # -- the state machine ---------------------------------------------------------------------

    def push(self, text: str) -> list[ParseEvent]:
        """Events that ``text`` (appended to everything before) makes certain."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[ParseEvent]:
        """Events for the held-back rest, once generation has ended."""
        if self._finished:
            return []
        events = self._drain(final=True)
        self._finished = True
        return events

    def _drain(self, final: bool) -> list[ParseEvent]:
        out: list[ParseEvent] = []
        while True:
            if self._mode == "start":
                head = self._buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self._buf = head[len(THINK_OPEN):]
                    self._mode = "reasoning"
                    self._new_segment()
                    continue
                if not final and THINK_OPEN.startswith(head):  # "" or "<th": undecided yet
                    return out
                self._mode = "content"
                self._new_segment()
                continue
            if self._mode == "reasoning":
                cut = self._buf.find(THINK_CLOSE)
                if cut != -1:
                    self._emit("reasoning", self._buf[:cut], out)
                    self._buf = self._buf[cut + len(THINK_CLOSE):]
                    self._mode = "content"
                    self._new_segment()
                    continue
                keep = 0 if final else _partial_tag_len(self._buf, THINK_CLOSE)
                self._emit("reasoning", self._buf[:len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            if self._mode == "content":
                cut = self._buf.find(TOOL_OPEN) if self._parse_tools else -1
                if cut != -1:
                    self._emit("content", self._buf[:cut], out)
                    self._buf = self._buf[cut + len(TOOL_OPEN):]
                    self._mode = "tool"
                    continue
                keep = (0 if final or not self._parse_tools
                        else _partial_tag_len(self._buf, TOOL_OPEN))
                self._emit("content", self._buf[:len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            # tool: wait for the closing tag; the whole call is one event
            cut = self._buf.find(TOOL_CLOSE)
            if cut == -1:
                if final:  # unterminated (max_tokens hit): give the text back as content
                    self._mode = "content"
                    self._buf, self._parse_tools = TOOL_OPEN + self._buf, False
                    continue
                return out
            body, self._buf = self._buf[:cut], self._buf[cut + len(TOOL_CLOSE):]
            call = parse_tool_call(body, self._id_factory())
            if call is None:  # not a valid call: the raw text is content
                self._emit("content", TOOL_OPEN + body + TOOL_CLOSE, out)
            else:
                self.tool_calls.append(call)
                out.append(("tool_call", call))
                # Text after a call is a new content segment (only its whitespace is dropped).
                self._new_segment()
            self._mode = "content"


@dataclass
class ParsedOutput:
    """A whole assistant reply, split."""

    content: str = ""
    reasoning_content: str | None = None  # None when the reply had no reasoning
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def collect(events: list[ParseEvent], into: ParsedOutput) -> ParsedOutput:
    """Appends parser events to ``into`` (shared by the non-streaming paths)."""
    for kind, value in events:
        if kind == "reasoning":
            into.reasoning_content = (into.reasoning_content or "") + value
        elif kind == "content":
            into.content += value
        else:
            into.tool_calls.append(value)
    return into


def parse_assistant_output(text: str, thinking: bool = False, parse_tools: bool = False,
                           id_factory: Callable[[], str] = new_tool_call_id) -> ParsedOutput:
    """Splits a finished reply (``thinking``: the prompt ended inside ``<think>``)."""
    parser = AssistantParser(thinking=thinking, parse_tools=parse_tools, id_factory=id_factory)
    out = ParsedOutput()
    collect(parser.push(text), out)
    return collect(parser.finish(), out)
