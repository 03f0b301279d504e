"""GRPO step anatomy: rollout and update tokens/s, and the share of step time in generation.

    python scripts/bench_grpo.py [--quick] [--init_from out/sft/final] [--prompts 8] [--group_size 8]

What it measures and how it reports it: ``perf.grpo``.
"""

from perf.grpo import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
