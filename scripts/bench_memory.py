"""Per-rank training memory (parameters, gradients, AdamW state, peak RSS), DDP against FSDP at
1, 2 and 4 CPU processes, and the activations kept with and without activation checkpointing.

    python scripts/bench_memory.py [--preset minimind2] [--worlds 1,2,4] [--json out.json]

What it measures and how: ``perf.memory``.
"""

from perf.memory import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
