"""Several stage scripts run one after the other in the same process(es), for the torchrun tests:
a launch of gloo processes is the slow part, so one launch trains several stages.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/stage_chain.py \
        train_grpo.py ARGS --then train_agent.py ARGS

Each script runs as `python SCRIPT ARGS` would run it (`__main__`), in one process group: a
stage's leaving it (trainer/stage.py's finish) is only a barrier until the last has run. Leaving
and joining again in the same processes is not reliable with gloo (the second join can read the
first group's peer addresses from the launcher's store: "connection refused", or a hang).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

from trainer import distributed as dist

REPO = Path(__file__).resolve().parents[1]


def split_runs(argv: list[str]) -> list[list[str]]:
    """`A --then B --then C` -> [A, B, C] (the test launchers' several runs per launch)."""
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def main() -> None:
    runs = split_runs(sys.argv[1:])
    leave = dist.cleanup
    dist.cleanup = dist.barrier
    try:
        for script, *args in runs:
            sys.argv = [script, *args]
            runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        dist.cleanup = leave
    dist.cleanup()


if __name__ == "__main__":
    main()
