"""MoE expert backends, one layer: tokens/s and resident memory, training or inference.

    python scripts/bench_moe.py [--quick] [--mode train|inference] [--backends kt,cpu,...] \
        [--json out]

What it measures and how it reports it: ``perf.moe``.
"""

from perf.moe import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
