"""Speculative decoding: several tokens proposed cheaply, then verified by one forward of the model.

Batch-1 decoding reads every weight once per token, so it is bound by memory bandwidth, and a
forward over a few tokens costs about what a forward over one costs. A round here:

1. proposes up to ``k`` tokens after the row's text: by a smaller *draft model* with the same
   tokenizer (``draft_model``, k = ``draft_tokens``), or by *prompt lookup* (``prompt_lookup`` = k:
   the tokens that followed the latest earlier occurrence of the text's last n-gram, n =
   ``max_ngram`` down to 1; no second model, as transformers' ``prompt_lookup_num_tokens``);
2. runs the target model once over the last committed token and the k proposals, all in the
   static cache of ``model/fast_decode.py`` (``StaticDecoder.step`` with tokens [B, 1 + k]);
3. keeps the longest accepted prefix plus one token of the target's own, so every round yields at
   least one token. Rejected positions are rolled back by position alone: the static step masks
   everything past a row's length, and the next round overwrites them.

The acceptance rule keeps the output distribution of plain decoding:
- greedy (temperature 0): a proposal is accepted while it equals the target's argmax, and the
  first mismatch is replaced by that argmax, so the tokens are those of plain greedy decoding;
- sampling: the rejection rule of Leviathan et al. 2023 (arXiv:2211.17192, Algorithm 1) and
  Chen et al. 2023 (arXiv:2302.01318): accept proposal d with probability min(1, p(d) / q(d)),
  else sample from norm(max(p - q, 0)), and after k acceptances sample a bonus token from p. Here
  p is exactly what plain sampling draws from (``sampling_distribution``: repetition penalty over
  the tokens so far including earlier proposals, temperature, top-k, top-p) and q is the draft's
  distribution under the same settings; prompt lookup's proposal is deterministic (q = one-hot),
  so it is accepted with probability p(d) and a rejection samples p without d.

Greedy identity holds up to floating-point: the verify forward multiplies 1 + k rows where plain
decoding multiplies one, so logits can differ in the last bits and flip a near-tie (as in every
speculative implementation); the tests check token identity on fp32 models.

Rows of a batch run together (each with its own length and proposals, shorter ones padded), so
``generate`` and the evaluation runner speculate batched; the server runs speculative requests
one at a time (serving/engine.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .fast_decode import StaticDecoder, compile_by_default, fast_path_reason
from .generate import SamplingParams, make_generator, sampling_distribution
from .model import MiniMindLM


@dataclass
class SpeculationStats:
    """Counters over every row decoded with one ``Speculation`` (a batch of B rows counts B
    verifications per forward)."""

    verifications: int = 0  # target forwards, per row (the prefill's first token not counted)
    drafted: int = 0  # proposals verified
    accepted: int = 0  # proposals accepted
    draft_forwards: int = 0  # draft-model forwards, per row

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens per target forward while decoding: 1 + accepted per round (plain decoding: 1)."""
        return (self.verifications + self.accepted) / self.verifications if self.verifications else 0.0

    def describe(self) -> str:
        return (f"speculation: {self.accepted}/{self.drafted} proposals accepted "
                f"({100 * self.acceptance_rate:.1f} %), {self.tokens_per_forward:.2f} tokens "
                f"per target forward")


@dataclass
class Speculation:
    """How to propose tokens; pass it to ``generate_tokens`` / ``generate`` / ``stream`` (or the
    engine). Exactly one source: ``draft_model`` or ``prompt_lookup`` > 0."""

    draft_model: MiniMindLM | None = None
    prompt_lookup: int = 0  # tokens proposed per round by n-gram lookup (0 = off)
    draft_tokens: int = 6  # tokens the draft model proposes per round, at most
    # A row stops proposing when the draft's most likely token has less probability than this
    # (llama.cpp's --draft-p-min; transformers' assistant_confidence_threshold): an unsure draft
    # is mostly rejected, and each of its steps costs a draft forward.
    draft_p_min: float = 0.5
    # After a round in which a row's draft got nothing accepted (it proposed nothing, or every
    # proposal was rejected), the row decodes without the draft for 1, 2, 4, ... rounds (at most
    # this many) before it tries again; an accepted proposal resets it. Why: a draft that is
    # never sure still costs its first step every round (0.70x plain decoding measured with
    # such a pair, docs/benchmarks.md); skipping it is a guess from past rounds only, so the
    # acceptance rule still keeps the target's distribution. 0 = always draft.
    draft_backoff: int = 16
    max_ngram: int = 3  # longest n-gram prompt lookup matches (then shorter ones, down to 1)
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def __post_init__(self) -> None:
        if (self.draft_model is None) == (self.prompt_lookup <= 0):
            raise ValueError("speculation needs exactly one of a draft model or prompt_lookup > 0")
        if not 0 <= self.draft_p_min < 1:
            raise ValueError(f"draft_p_min must be in [0, 1), got {self.draft_p_min}")
        if self.draft_backoff < 0:
            raise ValueError(f"draft_backoff must be >= 0, got {self.draft_backoff}")
        if self.prompt_lookup < 0 or self.draft_tokens < 1 or self.max_ngram < 1:
            raise ValueError(f"prompt_lookup ({self.prompt_lookup}) must be >= 0, draft_tokens "
                             f"({self.draft_tokens}) and max_ngram ({self.max_ngram}) >= 1")

    @property
    def k(self) -> int:
        return self.prompt_lookup if self.draft_model is None else self.draft_tokens

    def check(self, model: MiniMindLM) -> None:
        """ValueError (one line) where speculation cannot run with this target model."""
        for role, m in (("model", model), ("draft model", self.draft_model)):
            reason = m is not None and fast_path_reason(m)
            if reason:
                raise ValueError(f"speculative decoding needs the static decode step; the {role} "
                                 f"cannot take it: {reason}")
        if self.draft_model is not None:
            tv, dv = model.config.vocab_size, self.draft_model.config.vocab_size
            if tv != dv:
                raise ValueError(f"the draft model's vocabulary ({dv}) differs from the "
                                 f"model's ({tv}): a draft needs the same tokenizer")

    def tokens(self, model: MiniMindLM, prompts: Sequence[Sequence[int]],
               params: list[SamplingParams], budget: list[int],
               should_stop: Callable[[int], bool] | None, compile: bool | None,
               ) -> Iterator[list[int | None]]:
        """``generate_tokens``' contract (it calls this), with None also for a row that has no
        token in a step because another row's round produced more."""
        self.check(model)
        return _speculative_tokens(model, prompts, params, budget, self, should_stop, compile)


def lookup_draft(ids: Sequence[int], k: int, max_ngram: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens of
    ``ids``, trying n = ``max_ngram`` first, down to 1; [] when nothing matches.

    The latest occurrence rather than transformers' first: in generated text the nearest repeat
    (a list, a copied identifier) is the likeliest to continue the same way."""
    L = len(ids)
    last = ids[-1] if L else None
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = list(ids[L - n:])
        for start in range(L - n - 1, -1, -1):
            if ids[start + n - 1] == last and list(ids[start:start + n]) == tail:
                return list(ids[start + n:start + n + k])
    return []


def _pad(tokens: list[int], width: int) -> list[int]:
    return tokens + [tokens[-1]] * (width - len(tokens))


@torch.inference_mode()
def _speculative_tokens(model, prompts, params, budget, spec: Speculation, should_stop, compile):
    device = next(model.parameters()).device
    compile = compile_by_default(device) if compile is None else compile
    B, longest = len(prompts), max(len(p) for p in prompts)
    steps = max(budget)
    V = model.config.vocab_size
    seen_BV = torch.zeros(B, V, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seen_BV[b, torch.tensor(p, dtype=torch.long, device=device)] = True
    generators = [make_generator(p.seed, device) for p in params]
    greedy = [p.temperature == 0 for p in params]
    stop_ids = [set(p.stop_token_ids) for p in params]
    seqs = [list(p) for p in prompts]  # committed tokens; the last one is not in the caches yet
    running, produced = [True] * B, [0] * B
    stats = spec.stats

    target = StaticDecoder(model, B, longest + steps, compile=compile)
    draft = None
    if spec.draft_model is not None:
        draft_context = spec.draft_model.config.max_position_embeddings
        # A row that would outgrow the draft's context decodes without proposals.
        uses_draft = [len(p) + n <= draft_context for p, n in zip(prompts, budget)]
        draft = StaticDecoder(spec.draft_model, B, min(longest + steps, draft_context), compile)
        draft.prefill_batch([list(p[:draft_context]) for p in prompts])
        synced = [len(p) for p in prompts]  # committed tokens in the draft's cache, per row
        misses, idle = [0] * B, [0] * B  # rounds with nothing accepted; rounds left undrafted

    def emit(new: list[list[int]]) -> Iterator[list[int | None]]:
        """Yields the rows' new tokens one step at a time; a row ends on a stop token, its
        budget or ``should_stop``, and the rest of its round is dropped."""
        for j in range(max(len(t) for t in new)):
            out: list[int | None] = [None] * B
            for b in range(B):
                if not running[b] or j >= len(new[b]):
                    continue
                tok = out[b] = new[b][j]
                seqs[b].append(tok)
                seen_BV[b, tok] = True
                produced[b] += 1
                if tok in stop_ids[b] or produced[b] >= budget[b]:
                    running[b] = False
            if all(t is None for t in out):
                return
            yield out
            for b in range(B):
                if running[b] and should_stop is not None and should_stop(b):
                    running[b] = False

    logits, probs = sampling_distribution(target.prefill_batch([list(p) for p in prompts]),
                                          params, seen_BV)
    first = [int(logits[b].argmax()) if greedy[b] else
             int(torch.multinomial(probs[b], 1, generator=generators[b])) for b in range(B)]
    yield from emit([[t] for t in first])

    while any(running):
        L = [len(s) for s in seqs]
        k = [min(spec.k, budget[b] - produced[b] - 1) if running[b] else 0 for b in range(B)]
        q: list[list[torch.Tensor]] = [[] for _ in range(B)]  # the draft's distributions
        if draft is None:
            drafts = [lookup_draft(seqs[b], k[b], spec.max_ngram) if k[b] > 0 else []
                      for b in range(B)]
        else:
            k = [k[b] if uses_draft[b] and not idle[b] else 0 for b in range(B)]
            idle = [max(n - 1, 0) for n in idle]
            synced = [n if uses_draft[b] else L[b] for b, n in enumerate(synced)]
            drafts = _propose(draft, seqs, L, k, params, greedy, seen_BV, generators, q, stats,
                              spec.draft_p_min, synced)
        # Every row verifies S tokens at positions L-1 ...; those past its own proposals are
        # padding and rolled back like rejections. S fits each running row's room in the cache.
        room = min(target.max_len - L[b] + 1 for b in range(B) if running[b])
        S = min(1 + max(len(d) for d in drafts), room)
        if target.compile:  # a compiled step has one graph per shape: always verify 1 + k
            S = max(S, min(1 + spec.k, room))
        drafts = [d[:S - 1] for d in drafts]
        tokens = torch.tensor([_pad([seqs[b][-1]] + drafts[b], S) for b in range(B)],
                              device=device)
        pos = torch.tensor([L[b] - 1 if running[b] else min(L[b] - 1, target.max_len - S)
                            for b in range(B)], device=device)
        verify_BSV = target.step(tokens, pos)
        new = _accept(verify_BSV, drafts, q, params, greedy, seen_BV, generators, running)
        for b in range(B):
            if running[b]:
                stats.verifications += 1
                stats.drafted += len(drafts[b])
                stats.accepted += len(new[b]) - 1
                if draft is not None:  # accepted proposals that went through the draft
                    synced[b] += min(len(new[b]) - 1, max(len(drafts[b]) - 1, 0))
                if draft is not None and k[b] > 0 and spec.draft_backoff:
                    misses[b] = 0 if len(new[b]) > 1 else misses[b] + 1
                    idle[b] = min(2 ** (misses[b] - 1), spec.draft_backoff) if misses[b] else 0
        yield from emit(new)


def _propose(draft: StaticDecoder, seqs, L, k, params, greedy, seen_BV, generators, q, stats,
             p_min: float, synced: list[int]):
    """The draft model's proposals, at most ``k[b]`` for row b (fewer where its top probability
    falls below ``p_min``), and (sampling rows) the distribution each was drawn from, appended
    to ``q[b]``. Where the proposals stop depends on the draft alone, so the acceptance rule
    still keeps the target's distribution.

    The draft's cache holds the first ``synced[b]`` committed tokens of row b (the caller adds
    the accepted proposals that went through the draft; the rest of its entries are stale):
    every committed token but the last one or two (after a round that accepted all proposals,
    neither the last proposal nor the bonus token went through the draft), more after rounds
    without the draft. A round starts by feeding the missing ones: the last two in one
    fixed-shape step (one of them again where only one is missing, which rewrites the same
    entry), or the longer runs through ``extend``."""
    k = list(k)
    K = max(k)
    if K == 0:
        return [[] for _ in seqs]
    B, device = len(seqs), seen_BV.device
    top = draft.max_len - 1
    start = [min(synced[b], L[b] - 1) for b in range(B)]
    if all(L[b] - start[b] <= 2 for b in range(B)):
        tokens = torch.tensor([s[-2:] for s in seqs], device=device)
        pos = torch.tensor([min(n - 2, top - 1) for n in L], device=device)
        logits = draft.step(tokens, pos)[:, -1]
    else:
        runs = [seqs[b][start[b]:] for b in range(B)]
        # a row past the draft's context (it never drafts: one token) writes at the cache's end
        logits = draft.extend(runs, [min(start[b], top + 1 - len(runs[b])) for b in range(B)])
    synced[:] = L
    seen = seen_BV.clone()
    proposals: list[list[int]] = [[] for _ in range(B)]
    for j in range(K):
        stats.draft_forwards += sum(1 for b in range(B) if j < k[b])
        pen, probs = sampling_distribution(logits, params, seen)
        top_p = (pen.softmax(-1) if probs is None else probs).amax(-1).tolist()
        chosen = []
        for b in range(B):
            if greedy[b]:
                chosen.append(int(pen[b].argmax()))
            else:
                chosen.append(int(torch.multinomial(probs[b], 1, generator=generators[b])))
                q[b].append(probs[b])
            if j < k[b] and top_p[b] < p_min:
                k[b] = j
            if j < k[b]:
                proposals[b].append(chosen[b])
        if j >= max(k) - 1:
            break
        ids = torch.tensor(chosen, device=device)
        seen[torch.arange(B, device=device), ids] = True
        logits = draft.step(ids, torch.tensor([min(n + j, top) for n in L], device=device))
    return proposals


def _accept(verify_BSV, drafts, q, params, greedy, seen_BV, generators, running):
    """Each row's accepted proposals plus one token of the target (the correction at the first
    rejection, or the bonus token after all were accepted)."""
    B, S, V = verify_BSV.shape
    # Position j of row b is scored as plain decoding would score it: after the proposals before j.
    seen = seen_BV.unsqueeze(1).repeat(1, S, 1)
    for b in range(B):
        for j, d in enumerate(drafts[b]):
            seen[b, j + 1:, d] = True
    pen, probs = sampling_distribution(verify_BSV.reshape(B * S, V),
                                       [p for p in params for _ in range(S)],
                                       seen.reshape(B * S, V))
    new: list[list[int]] = []
    for b in range(B):
        n, d = len(drafts[b]), drafts[b]
        if not running[b]:
            new.append([])
            continue
        if greedy[b]:
            target = pen[b * S:b * S + n + 1].argmax(-1).tolist()
            a = 0
            while a < n and d[a] == target[a]:
                a += 1
            new.append(d[:a] + [target[a]])
            continue
        p, g = probs[b * S:b * S + n + 1], generators[b]
        for a in range(n + 1):
            if a == n:  # every proposal accepted: a bonus token from the target
                new.append(d + [int(torch.multinomial(p[n], 1, generator=g))])
                break
            q_d = float(q[b][a][d[a]]) if q[b] else 1.0
            if float(torch.rand((), generator=g, device=p.device)) * q_d < float(p[a, d[a]]):
                continue
            if q[b]:
                residual = (p[a] - q[b][a]).clamp(min=0)
            else:  # lookup's one-hot proposal: p without the rejected token
                residual = p[a].clone()
                residual[d[a]] = 0
            if float(residual.sum()) <= 0:  # p == q: rejection had probability 0
                residual = p[a]
            new.append(d[:a] + [int(torch.multinomial(residual, 1, generator=g))])
            break
    return new
