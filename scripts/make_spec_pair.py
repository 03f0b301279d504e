"""The minimind2-small target and its distilled draft for the speculative-decoding benchmark.

    python scripts/make_spec_pair.py [--out out/spec_pair] [--target_steps 400] [--draft_steps 200]

What it trains and on what: ``perf.spec_pair``.
"""

from perf.spec_pair import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
