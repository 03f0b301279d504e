"""Verifiable rewards for RL (train_grpo.py): plain functions `(completion, sample) -> float`.

Scope: the reward functions, the registry that names them, `RewardModelScore` (a learned reward
model's score: `reward_model:PATH`, which needs no gold answer) and `parse_reward_spec` /
`RewardMix`, which turn `--reward correctness:1.0,format:0.1` into one weighted sum.

`completion` is the generated text (stop token excluded). `sample` is the prompt's record
(`tasks.rl_prompt`: `task` = a name of `tasks.NAMES`, `gold`, and what else that task's
`correct` needs) plus what the rollout knows about this completion: `completion_tokens`,
`max_new_tokens` and `truncated` (hit the budget without a stop token).

Correctness asks the sample's task (`tasks.get(task).correct`) about `answer_text(completion)`
(the text after a closed think block), with the scorer `eval_model.py` uses, so a rollout
counted correct is one the benchmark would count correct.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

import tasks
from common.errors import UserError
from dataset.chat import encode_conversation
from evaluation.runner import answer_text
from trainer.reward_model import is_reward_model, load_reward_model, token_values

RewardFn = Callable[[str, Mapping[str, Any]], float]


class RewardSpecError(UserError, ValueError):
    """A `--reward` value that does not parse or names an unknown reward."""


def correctness_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 when the scorer of the sample's task counts the answer correct, else 0.0."""
    return float(tasks.get(sample["task"]).correct(answer_text(completion), sample))


def format_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """Half for the task's answer marker after the think block (`#### n`, `\\boxed{}`, "answer
    is"), half for a well-formed think block: every `<think>` closed, and with thinking on (the
    prompt opened `<think>`) a `</think>` present. 1.0 = both."""
    marker = tasks.get(sample["task"]).ANSWER_MARKER.search(answer_text(completion)) is not None
    opened = completion.count("<think>") + (1 if sample.get("thinking") else 0)
    closed = completion.count("</think>") == opened
    return 0.5 * marker + 0.5 * closed


def length_penalty(completion: str, sample: Mapping[str, Any]) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), in [-1, 0]:

        R(y) = 0                          if |y| <= L_max - L_cache
             = (L_max - L_cache - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -1                         if |y| > L_max (here: truncated without a stop)

    with L_max = max_new_tokens and L_cache = L_max / 4: a reply is nudged to finish within the
    first three quarters of its budget, and one cut off by the budget gets the full penalty.
    """
    budget = int(sample["max_new_tokens"])
    if sample.get("truncated"):
        return -1.0
    cache = max(1, budget // 4)
    excess = int(sample["completion_tokens"]) - (budget - cache)
    return -min(1.0, max(0.0, excess / cache))


def tool_format_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """Agent rollouts (trainer/agent.py): 1.0 when every `<tool_call>` tag is balanced and every
    call was well formed (parsable, a known tool, schema-valid arguments), else 0.0."""
    return float(not sample.get("unbalanced_tags") and not sample.get("invalid_calls"))


def tool_count_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """Agent rollouts: 1.0 when the number of calls is the number the item needs (its `tools`
    list; none for a distractor, where any call is wrong), else 0.0."""
    return float(sample.get("tool_calls", 0) == len(sample.get("tools") or []))


REWARDS: dict[str, RewardFn] = {"correctness": correctness_reward, "format": format_reward,
                                "length": length_penalty, "tool_format": tool_format_reward,
                                "tool_count": tool_count_reward}
REWARD_MODEL = "reward_model"       # `reward_model:PATH[:WEIGHT]`
NEEDS_GOLD = ("correctness", "format")   # they ask the sample's task


class RewardModelScore:
    """`reward_model:PATH`: the score a trained reward model (train_reward.py's folder) gives the
    prompt's conversation followed by the completion, as the assistant's reply: its value head
    at the last token, the sequence rendered by the chat template exactly as its training pairs
    were (oldest exchanges dropped first when longer than the model's context).

    The model loads on the first call, on `device`, in eval mode; `tokenizer` must be the one it
    was trained with (the policy's, in a stage: the reward model is usually trained from the
    same SFT model). One forward per completion, no gradient.
    """

    def __init__(self, path: str, tokenizer: Any = None, device: torch.device | str | None = None) -> None:
        self.path, self.tokenizer, self.device = path, tokenizer, device
        self._model: Any = None

    def __call__(self, completion: str, sample: Mapping[str, Any]) -> float:
        if self._model is None:
            if self.tokenizer is None:
                raise ValueError("RewardModelScore needs the tokenizer the reward model was trained with")
            self._model = load_reward_model(self.path, self.device)
        model = self._model
        messages = [*sample["messages"], {"role": "assistant", "content": completion}]
        enc = encode_conversation(self.tokenizer, messages, sample.get("tools"),
                                  model.config.max_position_embeddings, mask_history=True)
        ids = torch.as_tensor(enc.ids, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad():
            values, _ = token_values(model, ids[None])
        return float(values[0, -1])


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """`"correctness:1.0,format:0.1"` -> [("correctness", 1.0), ("format", 0.1)]; a bare name
    weighs 1.0. `reward_model:PATH` or `reward_model:PATH:WEIGHT` -> ("reward_model:PATH", w),
    PATH a reward model folder. Unknown names, bad weights and paths that hold no reward model
    raise RewardSpecError naming the entry."""
    out: list[tuple[str, float]] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, _, weight = entry.partition(":")
        name = name.strip()
        if name == REWARD_MODEL:
            path, _, weight = weight.partition(":")
            if not is_reward_model(path.strip()):
                raise RewardSpecError(f"reward: {entry!r}: {path.strip()!r} is not a reward model folder "
                                      "(config.json, model.safetensors, value_head.safetensors: "
                                      "train_reward.py's out_dir/final)")
            name = f"{REWARD_MODEL}:{path.strip()}"
        elif name not in REWARDS:
            raise RewardSpecError(f"reward: unknown reward {name!r} in {spec!r} "
                                  f"(one of: {', '.join(REWARDS)}, {REWARD_MODEL}:PATH)")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise RewardSpecError(f"reward: weight {weight!r} of {name!r} is not a number") from None
        if any(n == name for n, _ in out):
            raise RewardSpecError(f"reward: {name!r} is listed twice in {spec!r}")
        out.append((name, w))
    if not out:
        raise RewardSpecError(f"reward: no reward named in {spec!r}")
    return out


@dataclass(frozen=True)
class RewardMix:
    """The weighted sum of named rewards; `score` also returns each part (logged as reward/<name>,
    a reward model's as reward/reward_model)."""

    parts: tuple[tuple[str, float], ...]
    functions: dict[str, RewardFn] = field(default_factory=dict, compare=False)

    @classmethod
    def from_spec(cls, spec: str, tokenizer: Any = None, device: torch.device | str | None = None
                  ) -> "RewardMix":
        """`tokenizer` and `device` serve a `reward_model:PATH` part (loaded on first use)."""
        parts = tuple(parse_reward_spec(spec))
        functions = {name: REWARDS.get(name) or RewardModelScore(name.partition(":")[2], tokenizer, device)
                     for name, _ in parts}
        return cls(parts, functions)

    @property
    def needs_gold(self) -> bool:
        """Whether a part asks the sample's task (correctness, format): prompts need a gold answer."""
        return any(name in NEEDS_GOLD for name, _ in self.parts)

    def score(self, completion: str, sample: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
        values = {name: self.functions[name](completion, sample) for name, _ in self.parts}
        total = sum(w * values[name] for name, w in self.parts)
        return total, {name.partition(":")[0]: v for name, v in values.items()}
