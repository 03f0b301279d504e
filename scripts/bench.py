"""Speed benchmark: this machine's peaks, then the model against them, in one run.

    python scripts/bench.py [--quick] [--only train,decode,moe] [--json out.json] \
        [--text_dir DIR_OF_TXT] [--spec_target DIR --spec_draft DIR --spec_prompts JSONL]

What it measures and how it reports it: ``perf.speed``.
"""

from perf.speed import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
