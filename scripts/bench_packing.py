"""SFT throughput on real data: supervised tokens per second of three data pipelines, one run.

    python scripts/bench_packing.py [--quick] [--records 3000] [--steps 6]

What it measures and how it reports it: ``perf.packing``.
"""

from perf.packing import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
