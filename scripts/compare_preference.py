"""Reward model, DPO, KTO and ORPO on the quickstart's synthetic data: held-out accuracies per seed.

    python scripts/compare_preference.py [--seeds 0 1] [--steps 60] [--out out/compare_preference]

What it runs and how it scores them: ``perf.preference``.
"""

from perf.preference import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
