"""Train a byte-level BPE tokenizer with MiniMind's special tokens and our chat template.

Scope: builds `tokenizer.json` + `tokenizer_config.json` (HF layout, so transformers'
`PreTrainedTokenizerFast` and `model.tokenizer.Tokenizer` both load the folder).

- Ids: `<|endoftext|>`=0 (pad/unk), `<|im_start|>`=1 (bos), `<|im_end|>`=2 (eos), then the
  ordinary (non-special) added tokens `<tool_call>` `</tool_call>` `<tool_response>`
  `</tool_response>` `<think>` `</think>` = 3..8, as in MiniMind's REFERENCE.md.
- Digits: every digit is its own pre-token (`\\p{N}` in PRETOKENIZE_REGEX), so "1234" is always
  1,2,3,4. A number's tokens then line up with its place
  values, which is what makes multi-digit arithmetic learnable for a small model; merged digit
  chunks ("12" + "34" vs "1" + "234") would hide the carries.
- Corpus: by default the project's own synthetic generator (dataset/synthetic.py), so
  `python scripts/train_tokenizer.py` reproduces the shipped `model/tokenizer/` exactly. Add JSONL
  (`text`, `conversations`, or DPO `chosen`/`rejected`) with --data or plain text with --text_files.
- Vocab: when the corpus has too few distinct pairs to reach --vocab_size merges, the id space is
  padded with `<|reserved_N|>` added tokens so the vocabulary is exactly --vocab_size (the
  model's embedding size contract); upstream MiniMind reserves `<|bufferN|>` ids the same way.

Chat template (CHAT_TEMPLATE below) renders MiniMind's ChatML format:
- `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn; the system message first; with tools, the
  system turn also lists them (Qwen style `<tools></tools>` block, one JSON per line).
- Every assistant turn starts with a think block: `<think>\\n{reasoning}\\n</think>\\n\\n{content}`,
  and an EMPTY one (`<think>\\n\\n</think>\\n\\n`) when the turn has no reasoning. That is exactly
  the thinking-off generation prompt, so for any conversation the prompt rendered for the last
  assistant turn is a prefix of the full rendering: what the model is trained on after
  `<|im_start|>assistant\\n` (the loss-masked span, through `<|im_end|>`) is what it must produce
  at inference. Reasoning is kept for every turn (not only the last) - simple and what
  training data needs. Reasoning comes from `reasoning_content`, or from a `<think>...</think>`
  prefix inside `content` (MiniMind's R1 data keeps it there).
- `tool_calls` follow the content as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
  (one per call, newline separated); consecutive `tool` messages become ONE user turn holding
  `<tool_response>\\n...\\n</tool_response>` blocks (Qwen3 style), so they are never in the loss.
- Generation prompt: `<|im_start|>assistant\\n` + `<think>\\n` if enable_thinking else
  `<think>\\n\\n</think>\\n\\n`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from common.atomic import atomic_write_text
from common.errors import UserError
from model.tokenizer import PRETOKENIZE_REGEX

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                "<think>", "</think>"]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "model" / "tokenizer"

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


def _jsonl_texts(path: Path) -> Iterator[str]:
    """Texts from one JSONL file: `text`, or every message content of conversations / DPO."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if "text" in rec:
                yield str(rec["text"])
            for key in ("conversations", "chosen", "rejected"):
                for msg in rec.get(key) or []:
                    for field in ("reasoning_content", "content"):
                        if isinstance(msg.get(field), str) and msg[field]:
                            yield msg[field]


def synthetic_texts(n: int, seed: int) -> Iterator[str]:
    """The default corpus: pretraining documents plus SFT conversations rendered with the chat
    template (so role names and the think-block newlines get merges of their own)."""
    from dataset.synthetic import pretrain_texts, sft_conversations
    from model.tokenizer import render_chat_template

    yield from pretrain_texts(n, seed)
    for rec in sft_conversations(n // 4, seed):
        yield render_chat_template(CHAT_TEMPLATE, rec["conversations"])


def build_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with per-digit splitting (see the module docstring)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train(texts: Iterable[str], vocab_size: int = 6400) -> Tokenizer:
    """Train BPE on `texts`; ids 0..8 are the special then the added tokens."""
    fixed = SPECIAL_TOKENS + ADDED_TOKENS
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=fixed, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    data = json.loads(tok.to_str())
    # The trainer registers every fixed token as special; only the first three are (the rest
    # must survive decode(skip_special_tokens=True), as in MiniMind).
    for entry in data["added_tokens"]:
        entry["special"] = entry["content"] in SPECIAL_TOKENS
        entry["normalized"] = False
    _pad_vocab(data, vocab_size)
    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for i, t in enumerate(fixed):
        assert tok.token_to_id(t) == i, f"{t} must have id {i}"
    return tok


def _pad_vocab(data: dict, vocab_size: int) -> None:
    """Append `<|reserved_N|>` tokens (model vocab + added entries) up to `vocab_size`."""
    vocab = data["model"]["vocab"]
    for n in range(vocab_size - len(vocab)):
        content, idx = f"<|reserved_{n}|>", len(vocab)
        vocab[content] = idx
        data["added_tokens"].append({"id": idx, "content": content, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False,
                                     "special": True})


def tokenizer_config(tok: Tokenizer) -> dict:
    """HF-style tokenizer_config.json, carrying the chat template."""
    decoder = {}
    for tid, tok_obj in sorted(tok.get_added_tokens_decoder().items()):
        if tok_obj.content.startswith("<|reserved_"):
            continue  # listed in tokenizer.json already; ~1000 entries would bloat the config
        decoder[str(tid)] = {"content": tok_obj.content, "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False, "special": tok_obj.special}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def save(tok: Tokenizer, out_dir: Path) -> None:
    """Write both files, each to a temp name then renamed, so a crash leaves no half file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.json": tok.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(tokenizer_config(tok), ensure_ascii=False,
                                                 indent=2)}
    for name, text in files.items():
        atomic_write_text(out_dir / name, text + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vocab_size", type=int, default=6400)
    ap.add_argument("--data", type=Path, nargs="*", default=[],
                    help="JSONL files (text / conversations / chosen+rejected)")
    ap.add_argument("--text_files", type=Path, nargs="*", default=[], help="plain text files")
    ap.add_argument("--no_synthetic", action="store_true", help="leave out the generator")
    ap.add_argument("--n_synthetic", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    missing = [str(p) for p in [*args.data, *args.text_files] if not p.is_file()]
    if missing:  # before the synthetic texts, which take a while
        raise UserError(f"no such file: {', '.join(missing)}")

    def corpus() -> Iterator[str]:
        if not args.no_synthetic:
            yield from synthetic_texts(args.n_synthetic, args.seed)
        for path in args.data:
            yield from _jsonl_texts(path)
        for path in args.text_files:
            yield path.read_text(encoding="utf-8")

    t0 = time.time()
    tok = train(corpus(), args.vocab_size)
    save(tok, args.out)
    learned = sum(1 for t in tok.get_vocab() if not t.startswith("<|reserved_"))
    print(f"vocab {tok.get_vocab_size()} ({learned} learned, "
          f"{tok.get_vocab_size() - learned} reserved) -> {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
