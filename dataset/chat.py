"""Conversations: validation/normalisation, chat-template rendering and the assistant loss mask.

Scope: everything between a list of messages and ``(input_ids, labels)``. The SFT, DPO and
distillation datasets all go through ``encode_conversation`` / ``messages_to_ids_and_labels``.

Loss mask (the MiniMind/ChatML rule): a token is supervised iff it lies in an assistant turn,
after the header ``<|im_start|>assistant\\n`` and up to and including that turn's ``<|im_end|>``.
The mask is found on token ids, not on character offsets: every ``bos_id`` (``<|im_start|>``)
followed by the ids of ``"assistant"`` opens a span, the next ``eos_id`` (``<|im_end|>``) closes
it. This survives any template text around the turns (system prompts, tool lists, think blocks,
tool responses rendered as user turns) and we check that the number of spans equals the number
of assistant messages, so a template that drops or merges turns fails loudly instead of
silently training on the wrong tokens. Message text may not contain the ChatML control strings
(they would be tokenized as control tokens and could forge a turn).

Truncation: from the right, to ``max_length`` tokens. A span cut by truncation keeps its
surviving tokens (no ``<|im_end|>``); callers drop samples left with no supervised token.
LLaMA-Factory's ``train_on_prompt`` (supervise the prompt tokens too) and ``mask_history``
(supervise the last reply only; truncation drops the oldest exchanges first) are options of
``encode_conversation``.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from model.model import IGNORE_INDEX  # the model's "no loss here" label

ROLES = ("system", "user", "assistant", "tool")
RESERVED_STRINGS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


class ChatTokenizer(Protocol):
    """The part of ``model.tokenizer.Tokenizer`` the data pipeline relies on."""

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int
    chat_template: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = False,
    ) -> str: ...


# --------------------------------------------------------------------------------------------
# normalisation (raises ValueError with a location-free message; readers add file:line)
# --------------------------------------------------------------------------------------------


def _parse_json_field(value: Any, what: str) -> Any:
    """Fields like ``tools``/``tool_calls`` arrive as JSON strings (MiniMind) or as objects."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON ({e.msg})") from None
    return value


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """A tool list (JSON string, one object or a list of objects) → list of dicts, or None."""
    if tools is None or tools == "" or tools == []:
        return None
    tools = _parse_json_field(tools, "tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of JSON objects")
    return tools or None


def _normalize_tool_call(call: Any, k: int) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise ValueError(f"tool call {k} must be an object")
    if isinstance(call.get("function"), dict):  # OpenAI style {"type": "function", "function": {...}}
        call = call["function"]
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call {k} has no 'name'")
    arguments = call.get("arguments", {})
    if not isinstance(arguments, (str, dict, list)):
        raise ValueError(f"tool call {k}: 'arguments' must be an object or a JSON string")
    return {"name": name, "arguments": arguments}


def _content_text(content: Any, i: int, role: str, tool_calls: bool) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant" and tool_calls:
        return ""  # OpenAI style: an assistant turn that only calls tools has null content
    if isinstance(content, list):  # content parts [{"type": "text", "text"|"value": ...}]
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type", "text") == "text"):
                raise ValueError(f"message {i}: only text content parts are supported")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise ValueError(f"message {i}: a text content part has no string 'text'")
            texts.append(text)
        return "".join(texts)
    if role == "tool" and isinstance(content, dict):
        return json.dumps(content, ensure_ascii=False)  # tool results are often raw JSON objects
    if content is None:
        raise ValueError(f"message {i} ({role}): missing 'content'")
    raise ValueError(f"message {i} ({role}): 'content' must be a string, got {type(content).__name__}")


def _check_reserved(text: str, i: int) -> None:
    for s in RESERVED_STRINGS:
        if s in text:
            raise ValueError(f"message {i}: text contains the reserved control string {s}")


def normalize_message(message: Any, i: int) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """One message → ``{"role", "content", "reasoning_content"?, "tool_calls"?}`` plus its tools."""
    if not isinstance(message, dict):
        raise ValueError(f"message {i} must be an object, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str):
        raise ValueError(f"message {i} has no 'role'")
    if role not in ROLES:
        raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    out: dict[str, Any] = {"role": role}
    calls = message.get("tool_calls")
    if calls not in (None, "", []):
        if role != "assistant":
            raise ValueError(f"message {i}: only assistant messages may have 'tool_calls'")
        calls = _parse_json_field(calls, f"message {i} tool_calls")
        calls = [calls] if isinstance(calls, dict) else calls
        if not isinstance(calls, list):
            raise ValueError(f"message {i}: 'tool_calls' must be a list")
        out["tool_calls"] = [_normalize_tool_call(c, k) for k, c in enumerate(calls)]
        _check_reserved(json.dumps(out["tool_calls"], ensure_ascii=False), i)
    out["content"] = _content_text(message.get("content"), i, role, "tool_calls" in out)
    _check_reserved(out["content"], i)
    reasoning = message.get("reasoning_content")
    if reasoning not in (None, ""):
        if role != "assistant" or not isinstance(reasoning, str):
            raise ValueError(f"message {i}: 'reasoning_content' must be a string on an assistant message")
        _check_reserved(reasoning, i)
        out["reasoning_content"] = reasoning
    # MiniMind puts the tool list on (usually the system) message as "tools"/"functions".
    tools = message.get("tools", message.get("functions"))
    return out, normalize_tools(tools) if tools is not None else None


def normalize_conversation(
    messages: Any, tools: Any = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Validate a conversation and return ``(messages, tools)`` in the canonical form.

    Rules: a non-empty list; known roles; string content (null allowed for a tool-calling
    assistant turn); at least one assistant turn (otherwise nothing would be trained). Idempotent.
    """
    if not isinstance(messages, list):
        raise ValueError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("empty conversation")
    found_tools = normalize_tools(tools)
    out = []
    for i, message in enumerate(messages):
        norm, msg_tools = normalize_message(message, i)
        found_tools = found_tools or msg_tools
        out.append(norm)
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("conversation has no assistant turn")
    if found_tools:
        _check_reserved(json.dumps(found_tools, ensure_ascii=False), 0)
    return out, found_tools


# --------------------------------------------------------------------------------------------
# assistant spans on token ids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    role_ids: tuple[int, ...]  # ids of "assistant" right after <|im_start|>
    newline_id: int | None  # id of "\n" when it is a single token


_HEADERS: "weakref.WeakKeyDictionary[Any, _Header]" = weakref.WeakKeyDictionary()


def _header(tokenizer: ChatTokenizer) -> _Header:
    try:
        return _HEADERS[tokenizer]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable, just recompute
        pass
    newline = tokenizer.encode("\n")
    header = _Header(tuple(tokenizer.encode("assistant")), newline[0] if len(newline) == 1 else None)
    try:
        _HEADERS[tokenizer] = header
    except TypeError:
        pass
    return header


def assistant_spans(ids: Sequence[int] | np.ndarray, tokenizer: ChatTokenizer) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges of each assistant reply: after ``<|im_start|>assistant\\n``,
    through the closing ``<|im_end|>`` (or to the end of ``ids`` when it was truncated away)."""
    arr = np.asarray(ids, dtype=np.int64)
    header = _header(tokenizer)
    role = np.asarray(header.role_ids, dtype=np.int64)
    ends = np.flatnonzero(arr == tokenizer.eos_id)
    spans: list[tuple[int, int]] = []
    for s in np.flatnonzero(arr == tokenizer.bos_id):
        j = int(s) + 1 + len(role)
        if j > len(arr) or not np.array_equal(arr[s + 1 : j], role):
            continue
        if spans and s < spans[-1][1]:
            continue  # cannot happen with valid ChatML; guards against nested headers
        # The role line ends in "\n", normally its own token. If BPE merged it into the first
        # content token, that token stays supervised: it carries content the model must emit.
        if j < len(arr) and header.newline_id is not None and arr[j] == header.newline_id:
            j += 1
        k = int(np.searchsorted(ends, j))
        end = int(ends[k]) + 1 if k < len(ends) else len(arr)
        spans.append((j, end))
    return spans


@dataclass
class EncodedChat:
    """A tokenized conversation: ids, the supervised-token mask, and whether it was cut."""

    ids: np.ndarray  # int64 [T]
    mask: np.ndarray  # bool [T]; True = the loss covers this token
    truncated: bool

    @property
    def labels(self) -> np.ndarray:
        return np.where(self.mask, self.ids, IGNORE_INDEX)


def _render_ids(tokenizer: ChatTokenizer, messages: list[dict[str, Any]], tools: Any) -> np.ndarray:
    return np.asarray(tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools)), dtype=np.int64)


def _drop_oldest_exchange(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation without its oldest user turn and everything up to the next user turn
    (the replies and tool results that answered it); system messages stay. None when only
    one exchange is left."""
    first = next(i for i, m in enumerate(messages) if m["role"] != "system")
    users = [i for i, m in enumerate(messages) if m["role"] == "user" and i > first]
    return messages[:first] + messages[users[0]:] if users else None


def encode_conversation(
    tokenizer: ChatTokenizer,
    messages: list[dict[str, Any]],
    tools: Any = None,
    max_length: int | None = None,
    *,
    last_turn_only: bool = False,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> EncodedChat:
    """Render with the tokenizer's chat template, tokenize, mask, then truncate from the right.

    ``last_turn_only`` supervises only the final assistant reply (DPO: prompt = everything before).
    LLaMA-Factory's two options:
    - ``train_on_prompt``: every token outside the assistant replies (system, user and tool turns,
      role headers) is supervised too; the replies follow the usual rule.
    - ``mask_history``: only the final assistant reply is supervised, and a conversation longer
      than ``max_length`` loses its oldest exchanges first (system messages stay), so truncation
      cuts history rather than the one reply that is trained. With ``train_on_prompt`` as well,
      the earlier replies are the only unsupervised tokens (LLaMA-Factory masks a history turn's
      target, not its prompt).
    Raises ValueError on invalid messages or when the template's assistant turns do not match.
    """
    messages, tools = normalize_conversation(messages, tools)
    ids = _render_ids(tokenizer, messages, tools)
    full_length = len(ids)
    while mask_history and max_length is not None and len(ids) > max_length:
        shorter = _drop_oldest_exchange(messages)
        if shorter is None or not any(m["role"] == "assistant" for m in shorter):
            break
        messages, ids = shorter, _render_ids(tokenizer, shorter, tools)
    spans = assistant_spans(ids, tokenizer)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if len(spans) != n_assistant:
        raise ValueError(
            f"the chat template rendered {len(spans)} assistant turns for {n_assistant} assistant messages"
        )
    mask = np.zeros(len(ids), dtype=bool)
    if train_on_prompt:
        mask[:] = True
        for start, end in spans:
            mask[start:end] = False
    for start, end in spans[-1:] if last_turn_only or mask_history else spans:
        mask[start:end] = True
    truncated = max_length is not None and full_length > max_length
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return EncodedChat(ids, mask, truncated)


def messages_to_ids_and_labels(
    tokenizer: ChatTokenizer,
    messages: list[dict[str, Any]],
    tools: Any = None,
    max_length: int | None = None,
    *,
    last_turn_only: bool = False,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one conversation; labels are -100 outside assistant replies and
    aligned with input_ids (the model shifts). See ``encode_conversation`` for the rules."""
    enc = encode_conversation(tokenizer, messages, tools, max_length, last_turn_only=last_turn_only)
    return enc.ids.tolist(), enc.labels.tolist()


def generation_prompt_ids(tokenizer: ChatTokenizer, messages: list[dict[str, Any]],
                          enable_thinking: bool, budget: int) -> list[int]:
    """The ids that prompt the next assistant reply, at most ``budget`` long: the oldest
    user/assistant exchanges are dropped (a system prompt is kept) until the rest fits."""
    msgs = list(messages)
    while True:
        ids = tokenizer.encode(tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, enable_thinking=enable_thinking))
        first = 1 if msgs[0]["role"] == "system" else 0
        if len(ids) <= budget or len(msgs) - first <= 1:
            return ids[-budget:]
        del msgs[first:first + 2]  # one user/assistant exchange
