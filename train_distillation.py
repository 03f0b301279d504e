r"""White-box knowledge distillation: a student learns a teacher's next-token distributions.

    python train_distillation.py --teacher_path out/sft_big/final --init_from out/sft_small/final \
        --data_path data/synthetic/sft.jsonl --alpha 0.5 --temperature 1.5 --max_steps 1000
    python train_distillation.py --teacher_path out/moe/final --model_preset tiny ...   # fresh student
    torchrun --nproc_per_node=2 train_distillation.py ...

Data are SFT conversations; on the assistant tokens the loss is
α·CE(student, data) + (1-α)·T²·KL(teacher_T ‖ student_T) (trainer/distill.py). The teacher may be
larger or MoE but must share the student's tokenizer and vocab_size (checked before training). It
runs frozen, in eval mode, under the loop's autocast; with `--packing` it gets the packed rows'
per-conversation attention and positions, as the student does. For a teacher with another tokenizer, distil
black-box instead: scripts/generate_sft_data.py, then train_full_sft.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import run_cli
from dataset.lm_dataset import make_collate
from model.io import load_pretrained
from trainer import distributed as dist
from trainer.config import ConfigError, TrainConfig, option, parse_config
from trainer.distill import VocabMismatchError, check_vocab, make_distill_loss
from trainer.loop import fit
from trainer.stage import build_model, finish, fit_args, generation_hooks, load_data, load_tokenizer


@dataclass
class DistillConfig(TrainConfig):
    """Distillation options (MiniMind: α 0.5, T 1.5; lr as full SFT for a pretrained student)."""

    out_dir: str = "out/distill"
    teacher_path: str = option("", "teacher model folder (config.json + model.safetensors), e.g. a final/ "
                             "or checkpoint folder")
    alpha: float = option(0.5, "weight of the hard-label CE; 1 - alpha goes to the KL to the teacher")
    temperature: float = option(1.5, "softmax temperature T for both models in the KL term")
    lr: float = 1e-5
    seq_len: int = 512
    batch_size: int = 16
    epochs: float = 1.0

    def _problems(self) -> list[str]:
        err = super()._problems()
        if not self.teacher_path:
            err.append("no teacher: pass --teacher_path MODEL_DIR")
        elif not (Path(self.teacher_path) / "config.json").is_file():
            err.append(f"teacher_path: no config.json in {self.teacher_path!r}")
        if not 0.0 <= self.alpha <= 1.0:
            err.append(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            err.append(f"temperature must be > 0, got {self.temperature}")
        return err


def main() -> None:
    cfg = parse_config(DistillConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    tokenizer = load_tokenizer(cfg)
    teacher = load_pretrained(cfg.teacher_path, device=env.device).eval().requires_grad_(False)
    student = build_model(cfg, tokenizer)
    try:   # before any data work: a mismatch is a setup error, not something to find at step 1
        check_vocab(student.config.vocab_size, teacher.config.vocab_size)
    except VocabMismatchError as exc:
        raise ConfigError(str(exc)) from None
    if env.is_main:
        n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
        print(f"[distill] teacher {n_t:,} params{' (MoE)' if teacher.config.use_moe else ''}, "
              f"student {n_s:,} params, alpha {cfg.alpha}, T {cfg.temperature}", flush=True)
    train, evals = load_data(cfg, "sft", tokenizer, env)
    result = fit(student, train, make_distill_loss(teacher, cfg.alpha, cfg.temperature), cfg,
                 eval_data=evals, collate_fn=make_collate(tokenizer.pad_id),
                 eval_hooks=generation_hooks(cfg, tokenizer), **fit_args(student, cfg))
    finish(student, cfg, env, result)


if __name__ == "__main__":
    run_cli(main)
