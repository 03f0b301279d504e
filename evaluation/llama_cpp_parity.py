"""scripts/check_gguf_llamacpp.py's quantized mode: our model exported to GGUF at several types,
run in llama.cpp (llama-cpp-python), against our fp32 model on held-out problems.

Scope: the two greedy decoders (ours: the static-cache step of ``model.generate`` at batch 1;
llama.cpp: one ``eval`` per token, argmax of its logits, no sampler), each a ``GenerateFn`` that
also records token ids and decode time, so the held-out accuracy is scored by
``evaluation.runner.run_task`` exactly as ``eval_model.py --bench gsm8k`` scores it (the chat
template, the task's answer extraction), and ``compare`` turns the records into one row per type:
accuracy, greedy agreement with our fp32 tokens, decode tok/s on both sides.

Decode speed counts the steps after the prompt (tokens after the first / their time), on both
sides, from Python: at this model size the per-token Python overhead (llama-cpp-python's
``eval`` copies the logits into numpy; our step builds its inputs) is part of what is measured.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.runner import Completion
from model.generate import SamplingParams, generate_tokens


@dataclass
class Decoded:
    """What one decoder produced for the prompts it was given, in call order."""

    ids: dict[str, list[int]] = field(default_factory=dict)          # prompt text → tokens
    prompt_ids: dict[str, list[int]] = field(default_factory=dict)   # prompt text → its tokens
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def note(self, prompt: str, prompt_ids: list[int], out: list[int], t_first: float,
             t_end: float) -> None:
        self.ids[prompt], self.prompt_ids[prompt] = out, prompt_ids
        self.decode_tokens += max(0, len(out) - 1)
        self.decode_seconds += t_end - t_first

    @property
    def tok_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else float("nan")


def _completion(text: str, out: list[int], stop: int, budget: int) -> Completion:
    finish = "stop" if out and out[-1] == stop else ("length" if len(out) >= budget else "stop")
    return Completion(text, len([t for t in out if t != stop]), finish)


def ours(model, tokenizer, max_new_tokens: int, record: Decoded):
    """A GenerateFn: our greedy batch-1 decode (static cache, the default path), recorded."""
    stop = model.config.eos_token_id
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(stop,))

    def fn(prompts: Sequence[str]) -> list[Completion]:
        done = []
        for p in prompts:
            ids = tokenizer.encode(p)
            out, t0 = [], time.perf_counter()
            t_first = t0
            for step in generate_tokens(model, [ids], params):
                if not out:
                    t_first = time.perf_counter()
                out.append(step[0])
            record.note(p, ids, out, t_first, time.perf_counter())
            text = tokenizer.decode([t for t in out if t != stop])
            done.append(_completion(text, out, stop, max_new_tokens))
        return done
    return fn


def llama_cpp(llm, stop: int, max_new_tokens: int, record: Decoded):
    """A GenerateFn over a loaded ``llama_cpp.Llama``: its own tokenizer, greedy argmax of its
    logits (no sampler, no repetition penalty), stop on ``stop``, recorded. The logits are read
    where llama.cpp's own sampler reads them (``llama_get_logits_ith(ctx, -1)``):
    ``Llama.scores`` is only filled with ``logits_all=True``, which computes every prompt row."""
    import numpy as np

    def fn(prompts: Sequence[str]) -> list[Completion]:
        done = []
        for p in prompts:
            ids = llm.tokenize(p.encode("utf-8"), add_bos=False, special=True)
            llm.reset()
            llm.eval(ids)
            out, t_first = [], time.perf_counter()
            while len(out) < max_new_tokens:
                nxt = int(np.argmax(last_logits(llm)))
                if not out:
                    t_first = time.perf_counter()
                out.append(nxt)
                if nxt == stop or len(out) == max_new_tokens:
                    break
                llm.eval([nxt])
            record.note(p, ids, out, t_first, time.perf_counter())
            text = llm.detokenize([t for t in out if t != stop], special=True).decode(
                "utf-8", errors="replace")
            done.append(_completion(text, out, stop, max_new_tokens))
        return done
    return fn


def last_logits(llm):
    """The logits of the last token ``llm`` evaluated, as a numpy view (no copy)."""
    import llama_cpp
    import numpy as np
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def agreement(reference: Decoded, other: Decoded) -> dict:
    """Greedy agreement with the reference decode: problems whose whole answer is the same
    tokens, tokens before the first difference as a share of the reference's tokens, prompts
    tokenized the same."""
    same = prefix = total = same_prompt = 0
    for prompt, want in reference.ids.items():
        got = other.ids[prompt]
        n = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        same += got == want
        prefix += n
        total += len(want)
        same_prompt += other.prompt_ids[prompt] == reference.prompt_ids[prompt]
    return {"same_answers": same, "n": len(reference.ids), "token_agreement": prefix / max(1, total),
            "same_prompt_tokens": same_prompt}


def tensor_types(path: str | Path) -> str:
    """The ggml types in a .gguf file with their tensor counts, e.g. 'Q4_0 28, Q8_0 1, F32 9'."""
    import collections

    import gguf
    counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return ", ".join(f"{k} {v}" for k, v in counts.most_common())


def accuracy(results: Sequence[dict]) -> float:
    return sum(bool(r["correct"]) for r in results) / max(1, len(results))



def chat_path(llm, tokenizer, items: Sequence[dict], ours_by_question: dict[str, str],
              max_tokens: int) -> dict:
    """The path a llama.cpp user takes: the file's own chat template and the chat API.
    llama-cpp-python renders ``tokenizer.chat_template`` with Python's Jinja2;
    ``llama-server --jinja`` renders the same template with llama.cpp's own engine (not run here).
    Per question: is the rendered prompt our template's text, and is the greedy answer of
    ``create_chat_completion`` our answer text?"""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from evaluation.runner import chat_prompt
    from tasks import gsm8k
    template = llm.metadata["tokenizer.chat_template"]
    render = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="")
    same_prompt = same_answer = 0
    for it in items:
        q = gsm8k.question(it)
        messages = [{"role": "user", "content": q}]
        same_prompt += render(messages=messages).prompt == chat_prompt(tokenizer, q)
        out = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1,
                                         repeat_penalty=1.0, max_tokens=max_tokens)
        same_answer += out["choices"][0]["message"]["content"] == ours_by_question[q]
    return {"n": len(items), "same_prompt": same_prompt, "same_answer": same_answer}
