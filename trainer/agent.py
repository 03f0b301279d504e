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
rows still live. Each row's KV cache is kept across its pauses (`_KeptCache`: a static-cache slot
per row at its own position): on resuming, only the new tokens (the reply's stop token, the tool
turn and the next assistant header) run through the model, all resumed rows in one forward, so a
turn costs its new tokens, not the whole conversation again. Models the static decode step cannot
run (model/fast_decode.py's `fast_path_reason`: MLA, offloaded experts, forward hooks) re-prefill
every row from its tokens at each turn instead, which is logged once. Both give the same tokens
and log-probs (tests/test_agent.py checks them against each other and a full forward);
`scripts/compare_agent.py --rollout_speed` times them. The tokens are exactly the ones sampled, so the loss
scores what the policy produced, and `Rollout.logps` holds the log-probs they were sampled with.
The action mask covers the model's own tokens only — never the prompt, never a tool result. A
row ends on a reply without calls (its answer), on `max_turns`, on a reply cut by the token
budget, or when the context is full.

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

import logging
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from model.fast_decode import StaticDecoder, compile_by_default, fast_path_reason
from model.generate import SamplingParams, decode_steps, start_decoding
from tools import ToolRegistry, default_registry, parse_tool_calls
from trainer import distributed as dist
from trainer.grpo import PromptDataset
from trainer.reference import ReferenceLogits, inference
from trainer.rewards import RewardMix
from trainer.rollout import Rollout, Rollouts, RolloutSettings

log = logging.getLogger(__name__)
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


class _KeptCache:
    """Every row's KV cache, kept across its tool pauses: one static-cache slot per row
    (model/fast_decode.py), each at its own position.

    Why per-row positions rather than a left-padded batch: rows pause at different points and
    resume with tool turns of different lengths, so one shared, left-padded timeline would have to
    be re-aligned at every turn (every cache shifted to the new longest row, pad masks rebuilt),
    while each row's RoPE positions must stay those it had alone. A slot per row at its own
    position is what the static step already does for the server's continuous batching: a resumed
    row only has its new tokens (the stop token of its reply, the tool turn, the next assistant
    header) run on top of its cache, all resumed rows in one forward (``StaticDecoder.extend``),
    and the decode step runs over the rows still live, kept in the low slots (``move_slot``) as
    rows end."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.decoder = model, None
        self.slot: dict[int, int] = {}     # row -> its slot
        self.cached: dict[int, int] = {}   # row -> how many of its tokens the slot holds

    def start(self, live: list[int], seqs: list[list[int]], steps: int):
        """``(logits after each live row's tokens, advance)`` for a turn of up to ``steps``
        tokens; the live rows take slots 0..len(live)-1."""
        context = self.model.config.max_position_embeddings
        room = min(max(len(seqs[k]) for k in live) + steps, context)
        if self.decoder is None:
            device = next(self.model.parameters()).device
            self.decoder = StaticDecoder(self.model, len(live), room, compile_by_default(device))
            first = self.decoder.prefill_batch([seqs[k] for k in live])
        else:
            for j, k in enumerate(live):   # slots only move down: a source is never overwritten
                if self.slot[k] != j:
                    self.decoder.move_slot(self.slot[k], j, self.cached[k])
            first = self.decoder.extend([seqs[k][self.cached[k]:] for k in live],
                                        [self.cached[k] for k in live])
        self.decoder.ensure_capacity(room)
        self.slot = {k: j for j, k in enumerate(live)}
        pos_B = torch.tensor([len(seqs[k]) for k in live], device=first.device)
        last = self.decoder.max_len - 1
        decoder = self.decoder

        def advance(next_B: torch.Tensor, step: int) -> torch.Tensor:
            # A row that has finished keeps being fed (fixed shapes); past the cache's end its
            # writes go to the last position, beyond the row's own tokens like all its others.
            return decoder.step(next_B, (pos_B + step).clamp(max=last))

        return first, advance

    def ended_turn(self, k: int, length: int) -> None:
        """Row k's reply ended at ``length`` tokens; its last token (the stop token) was
        sampled but not fed, so the slot surely holds ``length - 1``."""
        self.cached[k] = length - 1


def _reprefill_reason(model: nn.Module, keep_cache: bool | None) -> str | None:
    """None when the rollout keeps each row's cache across tool pauses, else why it re-prefills
    (logged once per model: a slower path is never silent)."""
    if keep_cache is False:
        return "keep_cache=False"
    reason = fast_path_reason(model)
    if keep_cache and reason:
        raise ValueError(f"the KV cache cannot be kept across tool pauses: {reason}")
    if reason and getattr(model, "_agent_reprefill_logged", None) != reason:
        log.info("agent rollouts re-prefill every row at each turn: %s", reason)
        model._agent_reprefill_logged = reason
    return reason


def sample_agent_groups(model: nn.Module, prompts: Sequence[Sequence[int]],
                        settings: RolloutSettings, seed: int, tokenizer: Any,
                        registry: ToolRegistry, max_turns: int, enable_thinking: bool = False,
                        keep_cache: bool | None = None
                        ) -> tuple[Rollout, list[str], list[dict[str, Any]]]:
    """G multi-turn rollouts per prompt: (the rollout, each row's last reply, its tool facts).

    `Rollout.completions` holds everything after the prompt (replies and tool turns), its action
    mask only the replies' tokens, and `Rollout.logps` the policy's log-probs of those tokens as
    they were sampled. `finished`: the last reply ended on the stop token. `keep_cache`: keep each
    row's KV cache across its pauses (default: wherever the static decode step runs the model;
    True insists, False re-prefills every row at each turn).
    """
    t0 = time.perf_counter()
    G, stop = settings.group_size, tokenizer.eos_id
    plain = dist.unwrap(model)
    context = plain.config.max_position_embeddings
    with inference(plain):   # the static step's conditions hold in eval mode, as it runs
        kept = _KeptCache(plain) if _reprefill_reason(plain, keep_cache) is None else None
    starts = [list(p) for p in prompts for _ in range(G)]
    seqs = [list(p) for p in starts]
    own = [[0] * len(p) for p in starts]   # 1 on the tokens the model sampled
    logps = [[0.0] * len(p) for p in starts]
    finals = [""] * len(seqs)
    finished = [False] * len(seqs)
    facts = [{"tool_calls": 0, "invalid_calls": 0, "tool_failures": 0, "unbalanced_tags": 0,
              "turns": 0} for _ in seqs]
    live = [k for k in range(len(seqs)) if len(seqs[k]) < context]
    for turn in range(max_turns):
        if not live:
            break
        params = [SamplingParams(max_new_tokens=settings.max_new_tokens,
                                 temperature=settings.temperature, top_p=settings.top_p,
                                 seed=(seed + 7919 * turn + k) % 2**62, stop_token_ids=(stop,))
                  for k in live]
        budget = [min(settings.max_new_tokens, context - len(seqs[k])) for k in live]
        replies: dict[int, list[int]] = {k: [] for k in live}
        with inference(plain):
            history = [seqs[k] for k in live]
            first, advance = (kept.start(live, seqs, max(budget)) if kept is not None else
                              start_decoding(plain, history, max(budget)))
            for step, logits in decode_steps(first, advance, history, params, budget):
                chosen = torch.tensor([t if t is not None else 0 for t in step], device=logits.device)
                z = logits.float()   # log π of the chosen tokens, untempered (what the loss scores)
                lp = (z.gather(1, chosen[:, None])[:, 0] - z.logsumexp(-1)).tolist()
                for j, tok in enumerate(step):
                    if tok is not None:
                        replies[live[j]].append(tok)
                        logps[live[j]].append(lp[j])
        still = []
        for k in live:
            reply = replies[k]
            seqs[k] += reply
            own[k] += [1] * len(reply)
            if kept is not None:
                kept.ended_turn(k, len(seqs[k]))
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
            logps[k] += [0.0] * len(extra)
            still.append(k)
        live = still
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length - 1)
    sampled = torch.zeros(len(seqs), length - 1)
    for k, s in enumerate(seqs):
        ids[k, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[k, :len(s) - 1] = torch.tensor(own[k][1:], dtype=torch.float32)  # t predicts t+1
        sampled[k, :len(s) - 1] = torch.tensor(logps[k][1:], dtype=torch.float32)
    completions = [s[len(p):] for s, p in zip(seqs, starts)]
    return (Rollout(ids, mask, completions, finished, time.perf_counter() - t0, sampled),
            finals, facts)


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
