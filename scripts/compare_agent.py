"""Tool use on held-out problems: plain SFT without tools, tool SFT, agent RL (paired sign test),
for several seeds; and agent rollouts with the KV cache kept against re-prefilled.

    python scripts/compare_agent.py [--seeds 0 1] [--scale default|smoke] [--out out/compare_agent]
    python scripts/compare_agent.py --rollout_speed [--model DIR --data tool_test.jsonl]

What it runs and how it scores them: ``perf.agent``.
"""

from perf.agent import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
