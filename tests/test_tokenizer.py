"""Tokenizer tests: ids, byte-level round trips, digit splitting, chat template rendering
(against an independent hand-written ChatML builder, transformers, and hand-written strings), loading errors,
MiniMind's upstream folder, and the training script on a tiny corpus."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from model.generate import TextStream
from model.tokenizer import ADDED_TOKENS, CHAT_MARKUP, CHAT_TEMPLATE, DEFAULT_DIR, Tokenizer, TokenizerError
from model.tokenizer_train import train
from tests.scripted_model import SPLIT_TEXT, split_script

UPSTREAM_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "minimind_tokenizer"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir()


# ---------------------------------------------------------------- ids and round trips

def test_special_and_added_token_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 6400 == len(tok)
    assert [tok.token_to_id(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]] == [0, 1, 2]
    assert [tok.token_to_id(t) for t in ADDED_TOKENS] == list(range(3, 9))
    # Special tokens are dropped by skip_special_tokens; the ordinary added ones are kept.
    ids = tok.encode("<|im_start|>user\n<think>x</think><tool_call><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\n<think>x</think><tool_call>"


def test_encode_adds_nothing_but_maps_special_strings(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("") == []
    ids = tok.encode("hello world")
    assert tok.bos_id not in ids and tok.eos_id not in ids


ROUND_TRIP = [
    "Tom has 125 apples and buys 37 more.",
    "我是MiniMind，一个小型语言模型。你好，世界！",
    "emoji: 😀👍🏽 👨‍👩‍👧 🇨🇳 ✨",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n",
    "  leading, trailing  \n\n\n\r\n\t  mixed   whitespace\u3000全角空格 ",
    "日本語とEnglishと中文 mixed ½ ∑ ñ é",
    "<|im_start|>assistant\n<think>\n\n</think>\n\nok<|im_end|>\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_token_bytes_concatenate_to_the_utf8_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_token_bytes_of_every_vocabulary_entry(tok: Tokenizer) -> None:
    """Each token's bytes are what the backend decodes it to, wherever they are whole UTF-8
    (a lone piece of a character decodes to U+FFFD instead); an unknown id is an error."""
    whole = 0
    for tid in range(tok.vocab_size):
        raw = tok.token_bytes(tid)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            assert "\ufffd" in tok.decode([tid]), tid
            continue
        whole += 1
        assert tok.decode([tid]) == text, tid
    assert whole > tok.vocab_size // 2
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_bytes(tok.vocab_size + 5)


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


def test_numbers_split_into_single_digits(tok: Tokenizer) -> None:
    pieces = [tok.id_to_token(i) for i in tok.encode("The change is 500 - 315 = 185.")]
    digits = [p.lstrip("Ġ") for p in pieces if any(ch.isdigit() for ch in p)]
    assert digits == list("500315185")


# ---------------------------------------------------------------- display text and streaming

def test_control_tokens_never_reach_display_text(tok: Tokenizer) -> None:
    reserved = [tok.token_to_id(f"<|reserved_{i}|>") for i in (0, 356, 606)]
    assert {0, 1, 2, *reserved} <= tok.control_ids
    assert len(tok.control_ids) == 3 + 607                          # im_*, endoftext + reserved
    assert not {tok.token_to_id(t) for t in CHAT_MARKUP} & tok.control_ids
    ids = tok.encode("<|im_start|>a<think>b</think><|reserved_356|>c<tool_call>d</tool_call>"
                     "<|endoftext|>e<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>b</think>c<tool_call>d</tool_call>e"


def test_upstream_control_tokens() -> None:
    if not UPSTREAM_DIR.is_dir():
        pytest.skip(f"MiniMind's upstream tokenizer not found at {UPSTREAM_DIR}")
    up = Tokenizer.from_dir(UPSTREAM_DIR)
    # <|buffer1|> is not marked special upstream but is a placeholder, never text.
    ids = up.encode("x<|buffer1|><|vision_pad|><think>y</think>z<|im_end|>")
    assert up.decode(ids, skip_special_tokens=True) == "x<think>y</think>z"


def test_text_stream_holds_split_characters_and_drops_control_tokens(tok: Tokenizer) -> None:
    script = split_script(tok)
    prefixes = [tok.decode(script[:k]) for k in range(1, len(script))]
    assert sum(p.endswith("\ufffd") for p in prefixes) >= 3       # the emoji is really split
    assert "\ufffd<|reserved_356|>" in tok.decode(script)           # ... around a control token
    stream = TextStream(tok, skip_token_ids=(tok.eos_id,))
    deltas = [stream.push(i) for i in script] + [stream.flush()]
    assert all("\ufffd" not in d and "<|" not in d for d in deltas), deltas
    assert "".join(deltas) == SPLIT_TEXT
    assert "🙂" in deltas                                           # released whole, once complete


# ---------------------------------------------------------------- chat template

# An independent render: the ChatML layout of ../shared/docs/REFERENCE.md built by hand in Python,
# not from the jinja template (rendering the template with plain Jinja2 only checked that our
# Jinja2 setup matches itself). Turns are "<|im_start|>{role}\n{content}<|im_end|>\n"; an
# assistant turn is "<think>\n{reasoning}\n</think>\n\n{content}" (reasoning from
# reasoning_content, else split out of an inline <think> block) followed by its tool calls;
# consecutive tool results share one user turn; tools go into the system turn, Qwen style.
TOOLS_PREAMBLE = ("# Tools\n\nYou can call the functions below. Their signatures are listed "
                  "inside <tools></tools>:\n<tools>")
TOOLS_POSTAMBLE = ("\n</tools>\n\nTo call a function, reply with a JSON object holding its name "
                   "and arguments inside <tool_call></tool_call> tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _chatml_reference(messages: list[dict], tools: list | None = None,
                      add_generation_prompt: bool = False, enable_thinking: bool = False) -> str:
    def turn(role: str, body: str) -> str:
        return f"<|im_start|>{role}\n{body}<|im_end|>\n"

    def as_json(x) -> str:
        return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)

    out: list[str] = []
    first_system = messages[0]["content"] if messages[0]["role"] == "system" else None
    if tools:
        head = "" if first_system is None else first_system + "\n\n"
        out.append(turn("system", head + TOOLS_PREAMBLE + "".join("\n" + as_json(t) for t in tools)
                        + TOOLS_POSTAMBLE))
    elif first_system is not None:
        out.append(turn("system", first_system))
    pending_tool_results: list[str] = []
    for i, m in enumerate(messages):
        content = m.get("content")
        content = "" if content is None else as_json(content)
        if m["role"] != "tool" and pending_tool_results:
            out.append(turn("user", "\n".join(pending_tool_results)))
            pending_tool_results = []
        if m["role"] == "system":
            if i > 0:
                out.append(turn("system", content))
        elif m["role"] == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is None and "</think>" in content:
                before, _, after = content.rpartition("</think>")
                reasoning, content = before.split("<think>")[-1], after
            content = content.lstrip("\n")
            body = f"<think>\n{(reasoning or '').strip(chr(10))}\n</think>\n\n{content}"
            for k, call in enumerate(m.get("tool_calls") or []):
                fn = call.get("function", call)
                if content or k > 0:
                    body += "\n"
                body += (f'<tool_call>\n{{"name": {json.dumps(fn["name"])}, "arguments": '
                         f'{as_json(fn.get("arguments", {}))}}}\n</tool_call>')
            out.append(turn("assistant", body))
        elif m["role"] == "tool":
            pending_tool_results.append(f"<tool_response>\n{content}\n</tool_response>")
        else:
            out.append(turn(m["role"], content))
    if pending_tool_results:
        out.append(turn("user", "\n".join(pending_tool_results)))
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n" + ("<think>\n" if enable_thinking
                                                 else "<think>\n\n</think>\n\n"))
    return "".join(out)


TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two <integers> & return the sum",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                     "b": {"type": "integer"}}}}}]
SHAPES: dict[str, tuple[list[dict], list | None]] = {
    "user_only": ([{"role": "user", "content": "hi"}], None),
    "system": ([{"role": "system", "content": "You are MiniMind."},
                {"role": "user", "content": "你是谁？"},
                {"role": "assistant", "content": "我是MiniMind。"}], None),
    "multi_turn": ([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "and 2+2?"},
                    {"role": "assistant", "content": "4"}], None),
    "reasoning": ([{"role": "user", "content": "think"},
                   {"role": "assistant", "content": "done", "reasoning_content": "\nstep 1\n"}],
                  None),
    "inline_think": ([{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "<think>\nr\n</think>\n\na"}], None),
    "tools": ([{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "add 2 and 3"},
               {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function",
                                "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
               {"role": "tool", "content": "5"},
               {"role": "assistant", "content": "It is 5."}], TOOLS),
    "tools_no_system_two_calls": ([
        {"role": "user", "content": "two sums"},
        {"role": "assistant", "content": "Calling.",
         "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}},
                        {"name": "add", "arguments": '{"a": 3, "b": 4}'}]},
        {"role": "tool", "content": "3"}, {"role": "tool", "content": "7"}], TOOLS),
    "late_system": ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], None),
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("gen,thinking", [(False, False), (True, False), (True, True)])
def test_template_matches_independent_render(tok: Tokenizer, name: str, gen: bool,
                                             thinking: bool) -> None:
    messages, tools = SHAPES[name]
    ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen,
                                   enable_thinking=thinking)
    ref = _chatml_reference(messages, tools=tools, add_generation_prompt=gen,
                            enable_thinking=thinking)
    assert ours == ref
    assert ours.count("<|im_start|>") == ours.count("<|im_end|>") + (1 if gen else 0)


@pytest.mark.parametrize("name", list(SHAPES))
def test_template_matches_transformers(tok: Tokenizer, name: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_DIR))
    messages, tools = SHAPES[name]
    for thinking in (False, True):
        ref = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                     add_generation_prompt=True, enable_thinking=thinking)
        assert tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                       enable_thinking=thinking) == ref
    text = "我是MiniMind 😀 123\n\n  x"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_template_hand_written_chat(tok: Tokenizer) -> None:
    messages = SHAPES["system"][0] + [{"role": "user", "content": "2+2?"}]
    expected = ("<|im_start|>system\nYou are MiniMind.<|im_end|>\n"
                "<|im_start|>user\n你是谁？<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n我是MiniMind。<|im_end|>\n"
                "<|im_start|>user\n2+2?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == (
        expected + "<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=True,
                                   enable_thinking=True) == expected + "<think>\n"


def test_template_hand_written_reasoning(tok: Tokenizer) -> None:
    expected = ("<|im_start|>user\nthink<|im_end|>\n"
                "<|im_start|>assistant\n<think>\nstep 1\n</think>\n\ndone<|im_end|>\n")
    assert tok.apply_chat_template(SHAPES["reasoning"][0]) == expected
    # A <think> block inside content renders the same as reasoning_content.
    assert tok.apply_chat_template(SHAPES["inline_think"][0]) == tok.apply_chat_template(
        [{"role": "user", "content": "q"},
         {"role": "assistant", "content": "a", "reasoning_content": "r"}])


def test_template_hand_written_tools(tok: Tokenizer) -> None:
    messages, tools = SHAPES["tools_no_system_two_calls"]
    out = tok.apply_chat_template(messages, tools=tools)
    tools_line = json.dumps(TOOLS[0], ensure_ascii=False)
    assert out.startswith("<|im_start|>system\n# Tools\n\n")
    assert f"<tools>\n{tools_line}\n</tools>" in out  # tojson must not HTML-escape "<" or "&"
    assert out.endswith(
        "<|im_start|>user\ntwo sums<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nCalling.\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n3\n</tool_response>\n"
        "<tool_response>\n7\n</tool_response><|im_end|>\n")


def test_generation_prompt_is_prefix_of_training_render(tok: Tokenizer) -> None:
    """The loss-mask contract: after the prompt comes exactly the assistant span."""
    for name in ("system", "multi_turn", "reasoning", "tools"):
        messages, tools = SHAPES[name]
        last = messages[-1]
        thinking = "reasoning_content" in last
        prompt = tok.apply_chat_template(messages[:-1], tools=tools, add_generation_prompt=True,
                                         enable_thinking=thinking)
        full = tok.apply_chat_template(messages, tools=tools)
        assert full.startswith(prompt), name
        assert full[len(prompt):].endswith(last["content"] + "<|im_end|>\n")
        assert "<|im_start|>" not in full[len(prompt):]


def test_minimind_json_string_fields(tok: Tokenizer) -> None:
    """MiniMind datasets store tools (on the system message) and tool_calls as JSON text."""
    messages, tools = SHAPES["tools"]
    as_strings = [dict(m) for m in messages]
    as_strings[0]["tools"] = json.dumps(tools)
    as_strings[2]["tool_calls"] = json.dumps(as_strings[2]["tool_calls"])
    assert tok.apply_chat_template(as_strings) == tok.apply_chat_template(messages, tools=tools)


def test_empty_messages_is_an_error(tok: Tokenizer) -> None:
    with pytest.raises(jinja2.TemplateError, match="empty"):
        tok.apply_chat_template([])


def test_shipped_template_is_the_scripts(tok: Tokenizer) -> None:
    assert tok.chat_template == CHAT_TEMPLATE


# ---------------------------------------------------------------- loading

def test_missing_folder_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_malformed_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text((DEFAULT_DIR / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match="tokenizer.json: not a valid"):
        Tokenizer.from_dir(tmp_path)


def test_upstream_minimind_tokenizer() -> None:
    if not UPSTREAM_DIR.is_dir():
        pytest.skip(f"MiniMind's upstream tokenizer not found at {UPSTREAM_DIR}")
    up = Tokenizer.from_dir(UPSTREAM_DIR)
    assert (up.vocab_size, up.pad_id, up.bos_id, up.eos_id) == (6400, 0, 1, 2)
    assert up.token_to_id("<think>") == 25
    text = "MiniMind 是一个小型语言模型 😀"
    assert up.decode(up.encode(text)) == text
    msgs = [{"role": "user", "content": "你好"}]
    # Upstream calls the flag open_thinking; ours passes both names.
    assert up.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True) == (
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert up.apply_chat_template(msgs, add_generation_prompt=True).endswith(
        "<think>\n\n</think>\n\n")


# ---------------------------------------------------------------- training script

def test_train_tiny_corpus_layout() -> None:
    corpus = ["Tom has 125 apples. 我是MiniMind。", "def f(x):\n    return x"] * 20
    small = train(corpus, vocab_size=400)
    assert small.get_vocab_size() == 400  # padded with <|reserved_N|> when the corpus is small
    assert [small.token_to_id(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            + ADDED_TOKENS] == list(range(9))
    specials = {t.content for t in small.get_added_tokens_decoder().values() if t.special}
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= specials
    assert not specials & set(ADDED_TOKENS)
    assert small.encode("2024").tokens == ["2", "0", "2", "4"]


def test_fingerprint_tracks_content(tok: Tokenizer) -> None:
    assert tok.fingerprint == Tokenizer.from_dir().fingerprint
    if UPSTREAM_DIR.is_dir():
        assert tok.fingerprint != Tokenizer.from_dir(UPSTREAM_DIR).fingerprint


def test_generation_prompt_tokens_are_a_prefix_of_the_training_tokens():
    """The answer must start at the same token boundary at inference as in training: the prompt
    ends in "</think>\\n\\n", and a pre-tokenizer that splits "\\n\\nAfter" differently from a
    trailing "\\n\\n" would start every answer with a token never seen there in training."""
    tok = Tokenizer.from_dir()
    for answer in ["After 251 people get off.", "\n\nLeading newlines", " spaced", "42", "中文"]:
        messages = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": answer}]
        full = tok.encode(tok.apply_chat_template(messages))
        prompt = tok.encode(tok.apply_chat_template(messages[:1], add_generation_prompt=True))
        assert full[: len(prompt)] == prompt, answer
