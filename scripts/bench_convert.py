"""Peak memory of importing a sharded Hugging Face checkpoint, as a ratio to its size.

    python scripts/bench_convert.py [--size_gb 2.5] [--shard_mb 500] [--compare] \
        [--dir /tmp/bench_convert]

What it measures and how it reports it: ``perf.convert``.
"""

from perf.convert import main

if __name__ == "__main__":
    main()
