"""Deterministic, resumable data order shared by all ranks.

Scope: which dataset indices each rank reads at each micro-step. The training stream is the
concatenation of one permutation per epoch, each drawn from (seed, epoch). Optimizer step `s` reads
stream positions [s*G, (s+1)*G) with G = batch_size * grad_accum * world_size (the global batch);
rank r's micro-step m takes the slice that starts at (m * world_size + r) * batch_size. The resume
state is only the number of samples consumed, so a run resumed with a different number of processes
(same global batch G) reads exactly the same samples; since the loop weights micro-batches by their
token counts, the gradient of a step does not depend on how G was split either.
Batches may straddle an epoch boundary (no sample is dropped or repeated within an epoch).
"""
from __future__ import annotations

from typing import Iterator

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a permutation of range(n) that depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


class StreamSampler:
    """Batch sampler (for DataLoader's `batch_sampler=`) yielding this rank's micro-batches.

    Starts at global sample position `start` (a multiple of the global batch) and yields
    `num_steps * grad_accum` lists of `batch_size` indices.
    """

    def __init__(self, dataset_len: int, batch_size: int, grad_accum: int, rank: int,
                 world_size: int, seed: int, start: int, num_steps: int) -> None:
        if dataset_len < 1:
            raise ValueError("the training dataset is empty")
        self.n, self.bs, self.accum = dataset_len, batch_size, grad_accum
        self.rank, self.world, self.seed = rank, world_size, seed
        self.start, self.num_steps = start, num_steps
        self.global_batch = batch_size * grad_accum * world_size

    def __len__(self) -> int:
        return self.num_steps * self.accum

    def _indices(self, pos: int, count: int) -> list[int]:
        """Dataset indices at stream positions [pos, pos + count)."""
        out: list[int] = []
        perm_epoch, perm = -1, torch.empty(0, dtype=torch.long)
        for p in range(pos, pos + count):
            epoch = p // self.n
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, epoch_permutation(self.n, self.seed, epoch)
            out.append(int(perm[p % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        perm_epoch, perm = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.num_steps):
            base = self.start + step * self.global_batch
            for micro in range(self.accum):
                first = base + (micro * self.world + self.rank) * self.bs
                epoch = first // self.n
                if epoch == (first + self.bs - 1) // self.n:   # common case: one epoch, one slice
                    if epoch != perm_epoch:
                        perm_epoch, perm = epoch, epoch_permutation(self.n, self.seed, epoch)
                    lo = first - epoch * self.n
                    yield perm[lo:lo + self.bs].tolist()
                else:
                    yield self._indices(first, self.bs)


def eval_indices(dataset_len: int, batch_size: int, num_batches: int, rank: int,
                 world_size: int) -> list[list[int]]:
    """This rank's share of the fixed validation batches: the first num_batches * batch_size
    samples in file order, batch b going to rank b % world_size, so the evaluated samples do not
    depend on the number of processes."""
    out = []
    for b in range(rank, num_batches, world_size):
        first = b * batch_size
        if first >= dataset_len:
            break
        out.append(list(range(first, min(first + batch_size, dataset_len))))
    return out
