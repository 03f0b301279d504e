"""PPO against GRPO from a partway SFT checkpoint of the quickstart, same rollout budget, per seed.

    python scripts/compare_rl.py [--run out/quickstart] [--seeds 0 1] [--steps 40] [--out out/compare_rl]

What it runs and how it scores them: ``perf.rl``.
"""

from perf.rl import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
