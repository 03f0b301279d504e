"""A tiny training script for the subprocess tests (resume after kill -9, torchrun).

Trains the real `tiny` model (dropout on, so RNG restore matters) on random token rows whose
labels are partly masked (so micro-batches carry different numbers of supervised tokens), through
`parse_config` + `fit` exactly like a stage script. Test-only extras:
  --step_sleep S        sleep S seconds per micro-batch (gives the killer time to strike)
  --crash_save_at N     at the checkpoint of step N, exit half-way through writing --crash_file
                        (--crash_kind enospc: fail that write with "No space left on device")
  --kill_at_step N      SIGKILL this process in step N's last micro-batch (after the earlier
                        micro-batches' backward: gradients half accumulated, nothing saved)
  --kill_in_save N      SIGKILL this process inside step N's checkpoint (state gathered, no file)
  --lora_rank R         LoRA (rank R, all linear layers, B = 0 at start) trains; the base is frozen
  --lora_init_seed S    start B from random values instead (so step 1 moves A too)
  ... --then ...         several runs, one after the other, in the same processes (and process
                        group): multi-process tests pay the start-up once
Writes out_dir/final_rank{R}.safetensors with each rank's final weights (gathered under FSDP).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

import safetensors.torch
import torch
from torch.utils.data import Dataset

from common.errors import run_cli
from model.config import MiniMindConfig
from model.lora import apply_lora, lora_parameters
from model.model import MiniMindLM
from tests.stage_chain import split_runs
from trainer import distributed as dist
from trainer.checkpoint import FAULT_ENV
from trainer.config import TrainConfig, option, parse_config
from trainer.loop import fit
from trainer.losses import lm_loss
from trainer.rng import seed_everything


@dataclass
class DriverConfig(TrainConfig):
    seq_len: int = 16
    batch_size: int = 4
    max_steps: int = 8
    log_every: int = 2
    dropout: float = option(0.1, "model dropout")
    num_samples: int = option(64, "random training rows")
    step_sleep: float = option(0.0, "seconds of sleep per micro-batch")
    crash_save_at: int = option(0, "fault-inject the checkpoint of this step (0 = never)")
    crash_file: str = option("trainer_state.safetensors", "file to crash in")
    crash_kind: str = option("exit", "exit (the process dies) or enospc (the write fails: disk full)")
    kill_at_step: int = option(0, "SIGKILL in this step's last micro-batch (0 = never)")
    kill_in_save: int = option(0, "SIGKILL inside this step's checkpoint (0 = never)")
    lora_rank: int = option(0, "train LoRA adapters of this rank only (0 = full training)")
    lora_init_seed: int = option(0, "random LoRA B from this seed (0 = zeros, the usual start)")
    eval_rows: int = option(0, "random validation rows, evaluated at the end (0 = none)")


class RandomRows(Dataset):
    """Deterministic random rows; the first k labels of row i are masked, k = i % (seq_len // 2)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq_len), generator=gen)
        self.cut = [i % (seq_len // 2) for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        labels = ids.clone()
        labels[: self.cut[i]] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def train(argv: list[str]) -> None:
    cfg = parse_config(DriverConfig, argv)
    env = dist.init_distributed(cfg.device)
    seed_everything(cfg.seed)
    model = MiniMindLM(MiniMindConfig.from_preset(cfg.model_preset, dropout=cfg.dropout))
    trainable = None
    if cfg.lora_rank:
        apply_lora(model, "all", cfg.lora_rank, 2.0 * cfg.lora_rank)
        trainable = lora_parameters(model)
        if cfg.lora_init_seed:
            gen = torch.Generator().manual_seed(cfg.lora_init_seed)
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    data = RandomRows(cfg.num_samples, cfg.seq_len, model.config.vocab_size)

    calls = [0]   # training micro-batches seen (no eval data here: every call is training)

    def loss_fn(m, batch):
        if cfg.step_sleep:
            time.sleep(cfg.step_sleep)
        calls[0] += 1
        if cfg.kill_at_step and calls[0] == cfg.kill_at_step * cfg.grad_accum:
            os.kill(os.getpid(), signal.SIGKILL)
        return lm_loss(m, batch)

    def on_save(m, step):
        if cfg.kill_in_save and step == cfg.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.crash_save_at and step == cfg.crash_save_at:
            os.environ[FAULT_ENV] = f"{cfg.crash_kind}:{cfg.crash_file}"
        return None

    evals = RandomRows(cfg.eval_rows, cfg.seq_len, model.config.vocab_size, seed=1) if cfg.eval_rows else None
    fit(model, data, loss_fn, cfg, evals, on_save=on_save, trainable=trainable)
    with dist.full_params(model) as plain:
        state = {k: v.detach().clone() for k, v in plain.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, os.path.join(cfg.out_dir, f"final_rank{env.rank}.safetensors"))


def main() -> None:
    for argv in split_runs(sys.argv[1:]):
        train(argv)
    dist.cleanup()


if __name__ == "__main__":
    run_cli(main)
