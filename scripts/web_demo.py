"""A Streamlit chat demo: streaming replies, sampling controls, thinking toggle, model choice.

    streamlit run scripts/web_demo.py -- --model out/sft [--lora out/lora]

The checkpoint can also be chosen in the sidebar (a folder under ``out/`` or any path typed in),
or preset with ``MINIMIND_WEB_MODEL`` / ``MINIMIND_WEB_LORA``.

Safety: model output is text to show, never code to run. MiniMind's demo passes replies through
``eval()``; we never evaluate, import or execute anything the model writes. Replies are rendered
as Markdown with Streamlit's default HTML escaping (``unsafe_allow_html`` is never set), or, with
"Plain text" chosen, as a literal code block.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from common.errors import UserError, one_line
from inference import load_for_inference
from model.generate import SamplingParams, stream
from model.precision import DTYPE_CHOICES
from serving.chat import AssistantParser

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "out"


@dataclass
class Settings:
    model_dir: str
    lora_dir: str
    temperature: float
    top_p: float
    max_new_tokens: int
    repetition_penalty: float
    thinking: bool
    system_prompt: str
    history_turns: int
    plain_text: bool


def cli_defaults() -> argparse.Namespace:
    """``-- --model DIR --lora DIR --dtype auto`` after ``streamlit run``, else the environment."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default=os.environ.get("MINIMIND_WEB_MODEL", ""))
    p.add_argument("--lora", default=os.environ.get("MINIMIND_WEB_LORA", ""))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default=os.environ.get("MINIMIND_WEB_DTYPE", "auto"), choices=DTYPE_CHOICES,
                   help="auto: bf16 where the hardware runs it natively, else fp32")
    args, _ = p.parse_known_args(sys.argv[1:])
    return args


def checkpoints_under(root: Path) -> list[str]:
    """Model folders (config.json + model.safetensors) up to two levels below ``root``."""
    if not root.is_dir():
        return []
    found = [p.parent for p in root.glob("*/config.json")] + \
        [p.parent for p in root.glob("*/*/config.json")]
    return sorted(str(p) for p in found if (p / "model.safetensors").is_file())


@st.cache_resource(max_entries=2, show_spinner="Loading the model...")
def load(model_dir: str, lora_dir: str, dtype: str):
    """Model + tokenizer, cached across reruns and sessions (read-only use is thread-safe)."""
    return load_for_inference(model_dir, lora_dir or None, device="cpu", dtype=dtype)


def sidebar(defaults: argparse.Namespace) -> Settings:
    default_model, default_lora = defaults.model, defaults.lora
    with st.sidebar:
        st.header("Model")
        found = checkpoints_under(OUT_DIR)
        if found:
            picked = st.selectbox("Checkpoints under out/", ["(type a path below)"] + found)
            if picked != "(type a path below)":
                default_model = picked
        model_dir = st.text_input("Checkpoint folder", value=default_model, key="model_dir")
        lora_dir = st.text_input("LoRA adapter folder (optional)", value=default_lora,
                                 key="lora_dir")
        st.header("Sampling")
        temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="temperature",
                                help="0 = greedy")
        top_p = st.slider("Top-p", 0.05, 1.0, 0.9, 0.05, key="top_p")
        max_new_tokens = st.slider("Max new tokens", 16, 2048,
                                   min(max(defaults.max_new_tokens, 16), 2048), 16,
                                   key="max_new_tokens")
        repetition_penalty = st.slider("Repetition penalty", 1.0, 2.0, 1.0, 0.05,
                                       key="repetition_penalty")
        thinking = st.toggle("Thinking (<think> block)", value=False, key="thinking")
        st.header("Conversation")
        system_prompt = st.text_area("System prompt", value="", key="system_prompt")
        history_turns = st.number_input("Past turns sent to the model", 0, 50, 6, key="turns")
        plain_text = st.radio("Show replies as", ["Markdown", "Plain text"],
                              key="render", horizontal=True) == "Plain text"
        if st.button("Clear chat", key="clear"):
            st.session_state.history = []
    return Settings(model_dir.strip(), lora_dir.strip(), temperature, top_p, max_new_tokens,
                    repetition_penalty, thinking, system_prompt, int(history_turns), plain_text)


def show(container, text: str, plain: bool) -> None:
    # Never eval: text is displayed, escaped (markdown without raw HTML) or verbatim (code).
    if plain:
        container.code(text, language=None)
    else:
        container.markdown(text)


def render_message(msg: dict, plain: bool) -> None:
    with st.chat_message(msg["role"]):
        if msg.get("reasoning"):
            with st.expander("Reasoning", expanded=False):
                show(st, msg["reasoning"], plain)
        show(st, msg["content"] or "*(empty reply)*", plain and bool(msg["content"]))


def build_prompt(tokenizer, history: list[dict], settings: Settings, context: int,
                 max_new: int) -> list[int]:
    """Chat-template the recent turns; drop the oldest ones until the prompt leaves room."""
    turns = history[-(2 * settings.history_turns + 1):]
    while True:
        messages = ([{"role": "system", "content": settings.system_prompt}]
                    if settings.system_prompt.strip() else [])
        # Past reasoning is not sent back (as Qwen3 does): it is long and the answer carries it.
        messages += [{"role": m["role"], "content": m["content"]} for m in turns]
        ids = tokenizer.encode(tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=settings.thinking))
        if len(ids) + min(max_new, 16) < context or len(turns) <= 1:
            return ids[-(context - 1):]  # a single over-long message is cut from the left
        turns = turns[2:] if len(turns) > 2 else turns[1:]


def reply(model, tokenizer, settings: Settings) -> dict:
    """Streams one assistant reply into the page and returns it as a history entry."""
    context = model.config.max_position_embeddings
    ids = build_prompt(tokenizer, st.session_state.history, settings, context,
                       settings.max_new_tokens)
    params = SamplingParams(max_new_tokens=min(settings.max_new_tokens, context - len(ids)),
                            temperature=settings.temperature, top_p=settings.top_p,
                            repetition_penalty=settings.repetition_penalty,
                            stop_token_ids=tuple({tokenizer.eos_id, tokenizer.pad_id}))
    parser = AssistantParser(thinking=settings.thinking)
    reasoning, content = "", ""
    with st.chat_message("assistant"):
        thinking_box = st.expander("Reasoning", expanded=True) if settings.thinking else None
        reasoning_slot = thinking_box.empty() if thinking_box else None
        content_slot = st.empty()

        def apply(events) -> None:
            nonlocal reasoning, content
            for kind, text in events:
                if kind == "reasoning":
                    reasoning += text
                    if reasoning_slot is not None:
                        show(reasoning_slot, reasoning, settings.plain_text)
                elif kind == "content":
                    content += text
                    show(content_slot, content + " ▌", False)

        for delta in stream(model, tokenizer, ids, params):
            apply(parser.push(delta))
        apply(parser.finish())
        show(content_slot, content or "*(empty reply)*", settings.plain_text and bool(content))
    return {"role": "assistant", "content": content, "reasoning": reasoning}


def main() -> None:
    st.set_page_config(page_title="minimind-forge chat", page_icon="💬", layout="wide")
    st.title("minimind-forge chat")
    defaults = cli_defaults()
    settings = sidebar(defaults)
    st.session_state.setdefault("history", [])
    if not settings.model_dir:
        st.info("Choose a checkpoint folder in the sidebar to start.")
        return
    try:
        model, tokenizer = load(settings.model_dir, settings.lora_dir, defaults.dtype)
    except UserError as e:  # a wrong folder or adapter: one line, the page stays; a bug shows its traceback
        st.error(f"Could not load the model: {one_line(e)}")
        return
    lora = f" + LoRA {Path(settings.lora_dir).name}" if settings.lora_dir else ""
    st.caption(f"{Path(settings.model_dir).name}{lora} · "
               f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters · "
               f"context {model.config.max_position_embeddings}")
    for msg in st.session_state.history:
        render_message(msg, settings.plain_text)
    prompt = st.chat_input("Say something")
    if prompt:
        st.session_state.history.append({"role": "user", "content": prompt})
        render_message(st.session_state.history[-1], settings.plain_text)
        st.session_state.history.append(reply(model, tokenizer, settings))


main()
