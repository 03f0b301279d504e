"""The project's tokenizer: a thin, typed wrapper over a HF `tokenizers` byte-level BPE.

Scope: load a tokenizer folder (`tokenizer.json` + `tokenizer_config.json`, HF layout) - ours in
`model/tokenizer/` (trained by scripts/train_tokenizer.py) or MiniMind's upstream one - encode and
decode text, and render the chat template stored in `tokenizer_config.json` with a sandboxed
Jinja2 environment configured like transformers' (trim/lstrip blocks, loop controls, a `tojson`
that keeps non-ASCII and key order, `raise_exception`), so a rendering here equals
`PreTrainedTokenizerFast.apply_chat_template` on the same folder.

`encode` never adds special tokens; the chat template is the only place they come from.

Also the vocabulary's fixed tokens (`SPECIAL_TOKENS`, `ADDED_TOKENS`) and our chat template
(`CHAT_TEMPLATE`, at the end), which `model.tokenizer_train` writes into a trained folder.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from common.errors import UserError

# Pre-token split (the Qwen2 pattern family): single digits, words with one leading space or
# punctuation mark, and every run of newlines as ONE pre-token whatever follows it. The GPT-2
# pattern splits "\n\nAfter" into "\n" + "\n" + "After" but a prompt that ends in "\n\n" into
# "\n\n": the generation prompt (ending "</think>\n\n") then starts the answer with a token the
# model never saw there in training, and the first words come out garbled.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


DEFAULT_DIR = Path(__file__).resolve().parent / "tokenizer"

# Ids 0..8 of our vocabulary, in this order: the special tokens (pad/unk, bos, eos), then the
# ordinary added tokens, as in MiniMind's REFERENCE.md. Only the first three are special: the
# rest must survive decode(skip_special_tokens=True).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                "<think>", "</think>"]

# Markup the assistant parser (serving/chat.py) reads out of generated text: always shown, even
# where a tokenizer folder marks these tokens special.
CHAT_MARKUP = frozenset(ADDED_TOKENS)

Message = dict[str, Any]


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The byte-level alphabet's inverse (GPT-2's `bytes_to_unicode`): printable Latin-1 bytes
    stand for themselves, every other byte b for chr(256 + its rank among those)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class TokenizerError(UserError, ValueError):
    """A tokenizer folder is missing a file, or a file is malformed."""


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes '<', '>' and '&' and sorts keys; chat templates need
    # plain JSON (transformers overrides it the same way).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str):
    """Compile a chat template string once (templates are re-rendered for every sample)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat_template(source: str, messages: Sequence[Message], tools: list | None = None,
                         add_generation_prompt: bool = False, enable_thinking: bool = False,
                         **extra: Any) -> str:
    """Render `source` with the variables transformers passes (no input normalisation here).

    `open_thinking` is passed too: it is upstream MiniMind's name for `enable_thinking`, so its
    template honours the flag when its folder is loaded.
    """
    return compile_chat_template(source).render(
        messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking, open_thinking=enable_thinking, **extra)


def _normalize(messages: Sequence[Message], tools: Any) -> tuple[list[Message], list | None]:
    """Accept MiniMind's JSON-string fields: `tools` (also on the first message) and
    `tool_calls` are stored as JSON text in its datasets; templates want lists of dicts."""
    out = [dict(m) for m in messages]
    if tools is None and out and out[0].get("tools"):
        tools = out[0]["tools"]
    if isinstance(tools, str):
        tools = json.loads(tools)
    for m in out:
        m.pop("tools", None)
        if isinstance(m.get("tool_calls"), str):
            m["tool_calls"] = json.loads(m["tool_calls"])
    return out, (tools or None)


def _token_content(value: Any) -> str | None:
    # HF configs store special tokens either as a string or as {"content": ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Byte-level BPE tokenizer + chat template. Build it with `Tokenizer.from_dir`."""

    def __init__(self, backend: _HFTokenizer, config: dict, source: str = "<memory>") -> None:
        self._tok = backend
        self.config = config
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template: str = config.get("chat_template") or ""
        self.pad_id = self._special_id("pad_token", "<|endoftext|>")
        self.bos_id = self._special_id("bos_token", "<|im_start|>")
        self.eos_id = self._special_id("eos_token", "<|im_end|>")
        self._fingerprint: str | None = None
        self._control_ids: frozenset[int] | None = None
        self._added_ids: frozenset[int] | None = None

    @classmethod
    def from_dir(cls, path: str | Path | None = None) -> "Tokenizer":
        """Load `path/tokenizer.json` and `path/tokenizer_config.json` (None = the default)."""
        folder = Path(path) if path is not None else DEFAULT_DIR
        tok_file, cfg_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
        for f in (tok_file, cfg_file):
            if not f.is_file():
                raise TokenizerError(f"{f}: missing (a tokenizer folder needs tokenizer.json "
                                     f"and tokenizer_config.json; see scripts/train_tokenizer.py)")
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{tok_file}: not a valid tokenizers file ({e})") from None
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{cfg_file}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{cfg_file}: expected a JSON object")
        if config.get("chat_template") is not None and not isinstance(config["chat_template"], str):
            # HF also allows a list of named templates; we only ship and read the single form.
            raise TokenizerError(f"{cfg_file}: chat_template must be a string")
        return cls(backend, config, str(folder))

    def _special_id(self, key: str, default: str) -> int:
        content = _token_content(self.config.get(key)) or default
        tid = self._tok.token_to_id(content)
        if tid is None:
            raise TokenizerError(f"{self.source}: {key} {content!r} is not in the vocabulary")
        return tid

    @property
    def fingerprint(self) -> str:
        """sha256 of everything that changes tokenization or rendering (cache keys use it)."""
        if self._fingerprint is None:
            h = hashlib.sha256(self._tok.to_str().encode("utf-8"))
            h.update(self.chat_template.encode("utf-8"))
            h.update(f"{self.pad_id},{self.bos_id},{self.eos_id}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids, none are added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` over many texts (parallel in the Rust backend)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def control_ids(self) -> frozenset[int]:
        """Ids that are never text to show: the added tokens marked special (`<|im_end|>`,
        `<|reserved_356|>`) or spelled `<|...|>` (upstream MiniMind's `<|buffer1|>` is not marked),
        except `CHAT_MARKUP`."""
        if self._control_ids is None:
            self._control_ids = frozenset(
                i for i, t in self._tok.get_added_tokens_decoder().items()
                if (t.special or (t.content.startswith("<|") and t.content.endswith("|>")))
                and t.content not in CHAT_MARKUP)
        return self._control_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte-level pieces are joined before UTF-8 decoding, so multi-byte
        characters split across tokens (Chinese, emoji) come back whole.

        `skip_special_tokens`: the text to show, without `control_ids` (the chat markup stays);
        the bytes on both sides of a dropped token join up.
        """
        ids = list(ids)
        if skip_special_tokens:
            control = self.control_ids
            ids = [i for i in ids if i not in control]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, tid: int) -> bytes:
        """The raw bytes one token stands for (what OpenAI's logprobs report as `bytes`): a
        piece of a multi-byte character decodes to U+FFFD alone, but its bytes are exact. Added
        tokens (`<|im_end|>`) are their text."""
        piece = self._tok.id_to_token(tid)
        if piece is None:
            raise ValueError(f"token id {tid} is not in the vocabulary ({self.vocab_size} tokens)")
        table = _byte_of_char()
        if self._added_ids is None:
            self._added_ids = frozenset(self._tok.get_added_tokens_decoder())
        if tid in self._added_ids or any(c not in table for c in piece):
            return piece.encode("utf-8")
        return bytes(table[c] for c in piece)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)

    def apply_chat_template(self, messages: Sequence[Message], tools: list | str | None = None,
                            add_generation_prompt: bool = False,
                            enable_thinking: bool = False) -> str:
        """Render `messages` with the stored template (ours: `CHAT_TEMPLATE` below).

        `tools` and `tool_calls` may be JSON strings, and tools may sit on the first message
        (MiniMind's dataset layout); they are parsed before rendering.
        """
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: tokenizer_config.json has no chat_template")
        msgs, tools = _normalize(messages, tools)
        return render_chat_template(self.chat_template, msgs, tools=tools,
                                    add_generation_prompt=add_generation_prompt,
                                    enable_thinking=enable_thinking)

# -- our chat template ----------------------------------------------------------------------------
#
# CHAT_TEMPLATE renders MiniMind's ChatML format:
# - `<|im_start|>{role}\n{content}<|im_end|>\n` per turn; the system message first; with tools, the
#   system turn also lists them (Qwen style `<tools></tools>` block, one JSON per line).
# - Every assistant turn starts with a think block: `<think>\n{reasoning}\n</think>\n\n{content}`,
#   and an EMPTY one (`<think>\n\n</think>\n\n`) when the turn has no reasoning. That is exactly
#   the thinking-off generation prompt, so for any conversation the prompt rendered for the last
#   assistant turn is a prefix of the full rendering: what the model is trained on after
#   `<|im_start|>assistant\n` (the loss-masked span, through `<|im_end|>`) is what it must produce
#   at inference. Reasoning is kept for every turn (not only the last) - simple and what
#   training data needs. Reasoning comes from `reasoning_content`, or from a `<think>...</think>`
#   prefix inside `content` (MiniMind's R1 data keeps it there).
# - `tool_calls` follow the content as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
#   (one per call, newline separated); consecutive `tool` messages become ONE user turn holding
#   `<tool_response>\n...\n</tool_response>` blocks (Qwen3 style), so they are never in the loss.
# - Generation prompt: `<|im_start|>assistant\n` + `<think>\n` if enable_thinking else
#   `<think>\n\n</think>\n\n`.
#
# Every tag opens with "-" so the whitespace between tags is dropped under any Jinja settings
# (HF renders with trim_blocks/lstrip_blocks; a plain Environment does not).
CHAT_TEMPLATE = """\
{#- minimind-forge chat template: ChatML + think blocks + Qwen-style tools. -#}
{%- if not messages %}{{- raise_exception('messages must not be empty') }}{%- endif %}
{%- set has_system = messages[0].role == 'system' %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if has_system %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n\\nYou can call the functions below. Their signatures are listed inside <tools></tools>:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool if tool is string else tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nTo call a function, reply with a JSON object holding its name and arguments inside <tool_call></tool_call> tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- elif message.content is none or message.content is undefined %}
        {%- set content = '' %}
    {%- else %}
        {%- set content = message.content | tojson %}
    {%- endif %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {%- set content = content.lstrip('\\n') %}
        {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}
        {%- if message.tool_calls %}
            {%- for call in message.tool_calls %}
                {%- set fn = call.function if call.function is defined else call %}
                {%- if content or not loop.first %}{{- '\\n' }}{%- endif %}
                {%- set args = fn.arguments if fn.arguments is defined else {} %}
                {{- '<tool_call>\\n{"name": ' + (fn.name | tojson) + ', "arguments": ' + (args if args is string else args | tojson) + '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking %}
        {{- '<think>\\n' }}
    {%- else %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
