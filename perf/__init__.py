"""Performance benchmarks (speed and memory) behind the ``scripts/bench*.py`` entry points.

- ``perf.common``: what several benchmarks share (best-of-N timing, CPU autocast).
- ``perf.speed`` (``scripts/bench.py``): machine peaks, then the training step, decoding,
  serving, MoE and the training loop measured against them.
- ``perf.moe`` (``scripts/bench_moe.py``): MoE expert backends of one layer, tokens/s and memory.
- ``perf.packing`` (``scripts/bench_packing.py``): SFT data pipelines, supervised tokens/s.
- ``perf.grpo`` (``scripts/bench_grpo.py``): a GRPO step's rollout vs update time.
- ``perf.mla`` (``scripts/bench_mla.py``): MLA decode, latent-space attention vs expansion.
- ``perf.convert`` (``scripts/bench_convert.py``): peak memory of a sharded HF import.
- ``perf.preference`` (``scripts/compare_preference.py``): reward model, DPO, KTO and ORPO on the
  synthetic data, held-out accuracies per seed (what they learn, not how fast).

Named ``perf`` rather than ``bench``: ``python scripts/bench.py`` puts ``scripts/`` first on
``sys.path``, where ``bench.py`` itself would shadow a ``bench`` package.
"""
