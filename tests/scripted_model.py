"""A tiny model that generates a fixed token sequence whatever the prompt, for checking what the
chat front ends (CLI, server, web demo) show: the sequence below splits multi-byte characters
across byte-level tokens of our shipped tokenizer and puts control tokens in the middle."""

from __future__ import annotations

from typing import Sequence

import torch

from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.tokenizer import Tokenizer

# What a person must see for SPLIT_SCRIPT: no control token, no U+FFFD, every character whole.
SPLIT_TEXT = "Hi 你好🙂 ok!"


def split_script(tok: Tokenizer) -> list[int]:
    """'Hi 你好' + the 4 byte-tokens of 🙂 with <|reserved_356|> after the 2nd + ' ok'
    + <|reserved_0|> + '!', then <|im_end|> (the stop token)."""
    smile = tok.encode("🙂")
    assert len(smile) == 4, smile                      # byte-level pieces: the split is real
    return (tok.encode("Hi 你好") + smile[:2] + [tok.token_to_id("<|reserved_356|>")] + smile[2:]
            + tok.encode(" ok") + [tok.token_to_id("<|reserved_0|>")] + tok.encode("!") + [tok.eos_id])


def scripted_model(script: Sequence[int], eos_id: int = 2,
                   turns: Sequence[Sequence[int]] | None = None) -> MiniMindLM:
    """The tiny preset with its logits overwritten so greedy decoding yields ``script`` (then
    ``eos_id``) for every prompt; a prefill (more than one input token) starts it over.
    ``turns``: one script per prefill instead (the k-th prompt gets the k-th, the last repeats),
    for multi-turn loops that send a new prompt each turn."""
    model = MiniMindLM(MiniMindConfig.from_preset("tiny")).eval()
    scripts = list(turns) if turns is not None else [script]
    state = {"step": 0, "prefill": -1}

    def force(module, args, out):
        if args[0].shape[1] > 1:
            state["step"] = 0
            state["prefill"] += 1
        script = scripts[min(max(state["prefill"], 0), len(scripts) - 1)]
        token = script[state["step"]] if state["step"] < len(script) else eos_id
        state["step"] += 1
        out.logits.fill_(-1e4)
        out.logits[:, -1, token] = 1e4
        return out

    model.register_forward_hook(force)
    return model
