"""Multi-turn agent rollouts for RL with tools (train_agent.py): the GRPO / DAPO / CISPO losses
of trainer/grpo.py on conversations that call tools.

Scope: `AgentPromptDataset` (prompts rendered with the tool list in the system turn),
`tool_turn_ids` (the tokens the chat template puts between a reply and the next one when tool
results come back), `sample_agent_groups` (G multi-turn rollouts per prompt) and `AgentRollouts`
(trainer/rollout.py's `Rollouts` with that sampler and tool metrics).

The rollout of one row: the model replies (one batched KV-cache decode over every live row of the
turn); a reply that ends on the stop token and holds `<tool_call>` blocks pauses the row: each
call runs through `tools.ToolRegistry` (a bad call is an `Error: ...` result, never an
exception), the result turn's tokens are appended, and the row resumes in the next turn with the
rows still live. Between turns a row is re-prefilled from its tokens (the cache is not kept across
a pause: the appended result turn must be encoded anyway, and a re-prefill of a few hundred tokens
is cheap next to decoding); the tokens themselves are exactly the ones sampled, so the loss scores
what the policy produced. The action mask covers the model's own tokens only — never the prompt,
never a tool result. A row ends on a reply without calls (its answer), on `max_turns`, on a reply
cut by the token budget, or when the context is full.

What the rewards see (trainer/rewards.py): the text is the last reply (empty when the row was
still calling tools at the end: no answer), and the context adds `tool_calls` (calls made),
`invalid_calls` (unparsable, unknown tool or schema-invalid arguments), `tool_failures` (every
call whose result was an error), `unbalanced_tags` (a reply whose `<tool_call>` / `</tool_call>`
counts differ) and `turns`. Metrics, as TRL's tool-calling GRPO logs them: tool_call_frequency
(calls per completion), tool_failure_rate (failed calls over calls) and turns.
Bit-exact resume: each turn's sampling seed is a function of the rollout's seed, the turn and the
row, and the rollout's seed of (seed, rank, step, micro-batch) as in trainer/rollout.py.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from model.generate import SamplingParams, generate_tokens
from tools import ToolRegistry, default_registry, parse_tool_calls
from trainer import distributed as dist
from trainer.grpo import PromptDataset
from trainer.reference import ReferenceLogits, inference
from trainer.rewards import RewardMix
from trainer.rollout import Rollout, Rollouts, RolloutSettings

_REPLY = "\u2063REPLY\u2063"   # a marker no template text contains


class AgentPromptDataset(PromptDataset):
    """Prompt records whose ids list the tools (`registry.schemas()`) in the system turn.
    Prompts longer than `budget` keep their end (the question)."""

    def __init__(self, records: Sequence[dict], tokenizer: Any, budget: int,
                 registry: ToolRegistry, enable_thinking: bool = False) -> None:
        self.records = list(records)
        schemas = registry.schemas()
        self.prompt_ids = [tokenizer.encode(tokenizer.apply_chat_template(
            r["messages"], tools=schemas, add_generation_prompt=True,
            enable_thinking=enable_thinking))[-budget:] for r in self.records]
        for r in self.records:
            r["thinking"] = enable_thinking


def tool_turn_ids(tokenizer: Any, results: Sequence[str], enable_thinking: bool = False) -> list[int]:
    """What follows a reply's stop token when `results` come back: the template's tool turn and
    the next generation prompt, read off a rendering of a marker conversation."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _REPLY}]
    msgs += [{"role": "tool", "content": r} for r in results]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    tail = text[text.index(_REPLY) + len(_REPLY):]
    stop = tokenizer.decode([tokenizer.eos_id])
    if not tail.startswith(stop):
        raise ValueError(f"the chat template does not end a reply with {stop!r}: {tail[:40]!r}")
    return tokenizer.encode(tail[len(stop):])


def sample_agent_groups(model: nn.Module, prompts: Sequence[Sequence[int]],
                        settings: RolloutSettings, seed: int, tokenizer: Any,
                        registry: ToolRegistry, max_turns: int, enable_thinking: bool = False
                        ) -> tuple[Rollout, list[str], list[dict[str, Any]]]:
    """G multi-turn rollouts per prompt: (the rollout, each row's last reply, its tool facts).

    `Rollout.completions` holds everything after the prompt (replies and tool turns), and its
    action mask only the replies' tokens. `finished`: the last reply ended on the stop token.
    """
    t0 = time.perf_counter()
    G, stop = settings.group_size, tokenizer.eos_id
    plain = dist.unwrap(model)
    context = plain.config.max_position_embeddings
    starts = [list(p) for p in prompts for _ in range(G)]
    seqs = [list(p) for p in starts]
    own = [[0] * len(p) for p in starts]   # 1 on the tokens the model sampled
    finals = [""] * len(seqs)
    finished = [False] * len(seqs)
    facts = [{"tool_calls": 0, "invalid_calls": 0, "tool_failures": 0, "unbalanced_tags": 0,
              "turns": 0} for _ in seqs]
    live = [k for k in range(len(seqs)) if len(seqs[k]) < context]
    for turn in range(max_turns):
        if not live:
            break
        params = [SamplingParams(max_new_tokens=min(settings.max_new_tokens, context - len(seqs[k])),
                                 temperature=settings.temperature, top_p=settings.top_p,
                                 seed=(seed + 7919 * turn + k) % 2**62, stop_token_ids=(stop,))
                  for k in live]
        replies: dict[int, list[int]] = {k: [] for k in live}
        with inference(plain):
            for step in generate_tokens(plain, [seqs[k] for k in live], params):
                for j, tok in enumerate(step):
                    if tok is not None:
                        replies[live[j]].append(tok)
        still = []
        for k in live:
            reply = replies[k]
            seqs[k] += reply
            own[k] += [1] * len(reply)
            f = facts[k]
            f["turns"] += 1
            finished[k] = bool(reply) and reply[-1] == stop
            text = tokenizer.decode(reply[:-1] if finished[k] else reply)
            answer = text.rsplit("</think>", 1)[-1]
            f["unbalanced_tags"] += answer.count("<tool_call>") != answer.count("</tool_call>")
            _, calls = parse_tool_calls(answer)
            finals[k] = "" if calls else text   # still calling tools at the end: no answer
            if not calls or not finished[k]:
                continue
            results = [registry.run(c) for c in calls]
            f["tool_calls"] += len(results)
            f["invalid_calls"] += sum(not r.valid_call for r in results)
            f["tool_failures"] += sum(not r.ok for r in results)
            extra = tool_turn_ids(tokenizer, [r.content for r in results], enable_thinking)
            if turn == max_turns - 1 or len(seqs[k]) + len(extra) >= context:
                continue
            seqs[k] += extra
            own[k] += [0] * len(extra)
            still.append(k)
        live = still
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length - 1)
    for k, s in enumerate(seqs):
        ids[k, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[k, :len(s) - 1] = torch.tensor(own[k][1:], dtype=torch.float32)  # t predicts t+1
    completions = [s[len(p):] for s, p in zip(seqs, starts)]
    return (Rollout(ids, mask, completions, finished, time.perf_counter() - t0), finals, facts)


class AgentRollouts(Rollouts):
    """`Rollouts` whose completions are multi-turn tool conversations (`sample_agent_groups`)."""

    def __init__(self, prompts: AgentPromptDataset, rewards: RewardMix, settings: RolloutSettings,
                 tokenizer: Any, reference: ReferenceLogits | None = None, seed: int = 0,
                 rank: int = 0, registry: ToolRegistry | None = None, max_turns: int = 3,
                 enable_thinking: bool = False) -> None:
        super().__init__(prompts, rewards, settings, tokenizer, reference, seed, rank)
        self.tokenizer, self.registry = tokenizer, registry or default_registry()
        self.max_turns, self.thinking = max_turns, enable_thinking

    def sample(self, model: nn.Module, indices: Sequence[int], seed: int
               ) -> tuple[Rollout, list[str], list[dict[str, Any]]]:
        prompts = [self.prompts.prompt_ids[i] for i in indices]
        return sample_agent_groups(model, prompts, self.settings, seed, self.tokenizer,
                                   self.registry, self.max_turns, self.thinking)

    def extra_metrics(self, extras: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        n = max(len(extras), 1)
        calls = sum(e["tool_calls"] for e in extras)
        return {"tool_call_frequency": calls / n,
                "tool_failure_rate": sum(e["tool_failures"] for e in extras) / calls if calls else 0.0,
                "invalid_call_rate": sum(e["invalid_calls"] for e in extras) / calls if calls else 0.0,
                "turns": sum(e["turns"] for e in extras) / n}
