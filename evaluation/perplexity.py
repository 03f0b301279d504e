"""Likelihood scoring with a model: perplexity of a text and log-probabilities of continuations.

Scope: the two places where evaluation reads the model's probabilities instead of its samples,
and the perplexity benchmark's data format (``load_texts``).

- ``perplexity(model, tokenizer, texts, max_length, stride)``: token-level perplexity and bits per
  byte of one or more documents (e.g. the WikiText-2 test file), by sliding windows. A document is
  ``[bos] + encode(text)``, the layout pretraining uses (dataset/lm_dataset.py), so every text token
  is predicted from at least the BOS token and bits per byte covers every byte of the text.
  Windows are ``max_length`` tokens long and end ``stride`` tokens apart; each window scores only
  the tokens no earlier window scored, so every token is scored exactly once with at least
  ``max_length - stride`` tokens of context (the HF "perplexity of fixed-length models" recipe,
  except that there the first token of each disjoint window goes unscored; here ``stride <
  max_length`` keeps one token of overlap so none is skipped).
- ``continuation_logprobs(model, tokenizer, requests)``: for (context, continuation) pairs, the sum
  of log P(continuation tokens | context, earlier continuation tokens) and the token count, one
  forward pass per batch; what ``tasks.commonsense.score_loglik`` needs. Context and
  continuation are tokenised separately (the continuation keeps its leading space, so " Paris"
  becomes the same tokens a model sees mid-sentence) and the context is cut from the left when the
  pair does not fit the model's context.

Both reduce to ``token_nll``: per-row summed negative log-likelihood of the positions marked in a
label tensor (``-100`` = not scored), computed in fp32 whatever the model dtype.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from dataset.convert._io import open_text
from dataset.jsonl import iter_records

__all__ = ["load_texts", "eval_mode", "token_nll", "PerplexityResult", "perplexity",
           "continuation_logprobs"]


def load_texts(path: str | Path) -> list[str]:
    """Documents for perplexity: a plain-text file is one document (WikiText is one stream);
    ``.jsonl`` / ``.json`` give one document per record's ``"text"``."""
    path = Path(path)
    if path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return [r.data["text"] for r in iter_records(path, "text")]
    with open_text(path) as f:
        return [f.read()]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` for the block, then the previous mode back (the trainer evaluates mid-run
    and must not come back with dropout switched off)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _context_len(model: torch.nn.Module) -> int:
    return int(model.config.max_position_embeddings)


@torch.inference_mode()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count of the scored positions, per row: ``([B] float64, [B] long)``.

    ``labels`` [B, S] is aligned with ``input_ids`` (the shift happens here, as in the model's own
    loss); rows are right-padded, which needs no attention mask: causality keeps pads after every
    real token out of its view.
    """
    device = _device(model)
    input_ids, labels = input_ids.to(device), labels.to(device)
    scored = (labels[:, 1:] != -100).any(0).nonzero()  # a label at position 0 has no predictor
    if len(scored) == 0:
        return torch.zeros(len(input_ids), dtype=torch.float64), torch.zeros(len(input_ids),
                                                                             dtype=torch.long)
    # Only positions that predict a scored label go through lm_head and the softmax: with
    # overlapping perplexity windows that skips the context half, the costly [S, vocab] part.
    first = int(scored[0]) + 1
    keep = input_ids.shape[1] - first + 1
    logits = model(input_ids, logits_to_keep=keep).logits[:, :-1].float()
    targets = labels[:, first:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=-100, reduction="none").view(targets.shape)
    # float64 for the sums: a 300k-token corpus summed in fp32 loses digits of the perplexity.
    return nll.double().sum(-1).cpu(), (targets != -100).sum(-1).cpu()


def _right_pad(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    lab = torch.full((len(rows), S), -100, dtype=torch.long)
    for b, (r, lb) in enumerate(zip(rows, labels)):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        lab[b, :len(lb)] = torch.tensor(lb, dtype=torch.long)
    return ids, lab


@dataclass
class PerplexityResult:
    """Totals over all documents; ``ppl = exp(nll_sum / tokens)``, ``bits_per_byte =
    nll_sum / (ln 2 · bytes)`` (tokenizer-independent, so models with different vocabularies
    compare)."""

    ppl: float
    mean_nll: float
    bits_per_byte: float
    nll_sum: float
    tokens: int
    bytes: int
    documents: int
    windows: int
    max_length: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` per window over ``n`` tokens; targets 1..n-1 each once.

    The first window scores all of its tokens but the first; each later one scores the next
    ``stride`` tokens with the ``max_length - stride`` before them as context, so every scored
    token has at least one token of context (hence ``stride < max_length``).
    """
    out: list[tuple[int, int, int]] = []
    first, end = 1, min(max_length, n)
    while first < n:
        out.append((max(0, end - max_length), end, first))
        first, end = end, min(end + stride, n)
    return out


def perplexity(model: torch.nn.Module, tokenizer, texts: str | Sequence[str],
               max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
               add_bos: bool = True) -> PerplexityResult:
    """Perplexity and bits per byte of ``texts`` (each an independent document; see module doc).

    ``max_length`` defaults to the model's context, ``stride`` to half of ``max_length`` (at
    most ``max_length - 1``: one token of overlap, nearly disjoint windows, fastest). With
    ``add_bos=False`` a document's first token is not scored and its bytes are left out of the
    byte count.
    """
    docs = [texts] if isinstance(texts, str) else list(texts)
    max_length = min(max_length or _context_len(model), _context_len(model))
    stride = stride or max(1, max_length // 2)
    if max_length < 2 or not 1 <= stride < max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= stride < max_length, "
                         f"got {max_length}, {stride}")
    jobs: list[tuple[list[int], list[int]]] = []  # (window ids, window labels)
    n_bytes = 0
    for text in docs:
        body = tokenizer.encode(text)
        if not body:
            continue
        ids = ([tokenizer.bos_id] if add_bos else []) + body
        n_bytes += len(text.encode("utf-8"))
        if not add_bos:
            n_bytes -= len(tokenizer.decode(body[:1]).encode("utf-8"))
        for begin, end, first in _windows(len(ids), max_length, stride):
            window = ids[begin:end]
            jobs.append((window, [-100] * (first - begin) + window[first - begin:]))
    nll_sum, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i:i + batch_size]
            ids_BS, lab_BS = _right_pad([j[0] for j in chunk], [j[1] for j in chunk],
                                        tokenizer.pad_id)
            s, c = token_nll(model, ids_BS, lab_BS)
            nll_sum += float(s.sum())
            count += int(c.sum())
    if count == 0:
        raise ValueError("no token to score: the texts are empty")
    mean = nll_sum / count
    return PerplexityResult(ppl=math.exp(mean), mean_nll=mean,
                            bits_per_byte=nll_sum / (math.log(2) * max(n_bytes, 1)),
                            nll_sum=nll_sum, tokens=count, bytes=n_bytes, documents=len(docs),
                            windows=len(jobs), max_length=max_length, stride=stride)


def continuation_logprobs(model: torch.nn.Module, tokenizer,
                          requests: Sequence[tuple[str, str]], batch_size: int = 8,
                          add_bos: bool = True) -> list[tuple[float, int]]:
    """``(sum log P(continuation | context), continuation tokens)`` per request, in order.

    Requests are processed longest first (less padding per batch; results are put back in
    request order). An empty continuation scores ``(0.0, 0)``.
    """
    limit = _context_len(model)
    rows: list[tuple[list[int], list[int]]] = []
    for ctx, cont in requests:
        c_ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(ctx)
        x_ids = tokenizer.encode(cont)[:limit - 1]
        c_ids = c_ids[-(limit - len(x_ids)):] if len(c_ids) + len(x_ids) > limit else c_ids
        if not c_ids:  # no context at all: the first continuation token cannot be scored
            c_ids = [tokenizer.bos_id]
            x_ids = x_ids[:limit - 1]
        rows.append((c_ids + x_ids, [-100] * len(c_ids) + x_ids))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with eval_mode(model):
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            ids_BS, lab_BS = _right_pad([rows[j][0] for j in idx], [rows[j][1] for j in idx],
                                        tokenizer.pad_id)
            s, c = token_nll(model, ids_BS, lab_BS)
            for k, j in enumerate(idx):
                out[j] = (-float(s[k]), int(c[k]))
    return out
