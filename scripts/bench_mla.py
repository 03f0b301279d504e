"""One MLA decode step from the latent cache: latent-space attention vs expanding the cache.

    python scripts/bench_mla.py [--cached 256 2048]

What it measures and how it reports it: ``perf.mla``.
"""

from perf.mla import main

if __name__ == "__main__":
    main()
