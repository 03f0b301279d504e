"""How far does one GRPO step reach? Cosines between policy gradients of independent rollouts.

For each of `--sets` disjoint sets of `--prompts` training prompts, the stage's own loss
(`trainer.grpo.GRPOLoss`: trainer.rollout's prompts x G, rewards, advantages; then the loss) is differentiated
twice, on two rollouts with different seeds. Printed: the mean cosine between the two gradients of
the same prompts (is the update a property of the prompts, or of the dice?) and between the
gradients of different prompt sets (does what one batch teaches point where another's does?).
A high first and a low second figure mean each step teaches something specific to its own few
problems, so twenty steps of 8 prompts touch 160 problems and little else.

    python scripts/grpo_gradients.py --init_from out/quickstart/sft/checkpoints/step_000400 \
        --data_path out/quickstart/data/sft.jsonl
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from inference import load_for_inference
from trainer import grpo
from trainer.rewards import RewardMix
from trainer.rollout import Rollouts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--init_from", required=True, help="model folder (with its tokenizer files)")
    ap.add_argument("--data_path", required=True, help="prompts with gold answers (as train_grpo.py)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--sets", type=int, default=3, help="disjoint prompt sets")
    ap.add_argument("--max_new_tokens", type=int, default=192)
    ap.add_argument("--loss", default="cispo", choices=grpo.LOSS_TYPES)
    ap.add_argument("--reward", default="correctness:1.0,format:0.1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model, tok = load_for_inference(args.init_from, device="cpu", dtype="fp32")
    records, _ = grpo.load_prompts([args.data_path], "", args.seed)
    data = grpo.PromptDataset(records, tok, 512 - args.max_new_tokens, False)
    low, high = grpo.DEFAULT_CLIP[args.loss]
    settings = grpo.GRPOSettings(args.loss, args.group_size, 0.0, low, high, 1, True,
                                 args.max_new_tokens, 1.0, 1.0, False)

    def gradient(indices: list[int], step: int) -> tuple[torch.Tensor, float]:
        rollouts = Rollouts(data, RewardMix.from_spec(args.reward), settings.rollout, tok, seed=args.seed)
        loss_fn = grpo.GRPOLoss(settings, rollouts, start_step=step)
        model.zero_grad(set_to_none=True)
        model.train()
        loss, metrics = loss_fn(model, {"prompt_index": torch.tensor(indices)})
        loss.backward()
        model.eval()
        flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return flat, metrics["accuracy"]

    sets = [list(range(k * args.prompts, (k + 1) * args.prompts)) for k in range(args.sets)]
    grads = [[gradient(s, step) for step in (0, 1)] for s in sets]   # step = the rollout seed
    same = [float(F.cosine_similarity(a[0], b[0], dim=0)) for a, b in grads]
    other = [float(F.cosine_similarity(grads[i][0][0], grads[j][0][0], dim=0))
             for i, j in itertools.combinations(range(args.sets), 2)]
    accuracy = [acc for pair in grads for _, acc in pair]
    print(f"{args.sets} sets x {args.prompts} prompts x G {args.group_size}, rollout accuracy "
          f"{sum(accuracy) / len(accuracy):.3f}")
    print(f"same prompts, new samples: cos {sum(same) / len(same):.3f} "
          f"({', '.join(f'{c:.3f}' for c in same)})")
    print(f"different prompts:         cos {sum(other) / len(other):.3f} "
          f"({', '.join(f'{c:.3f}' for c in other)})")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
