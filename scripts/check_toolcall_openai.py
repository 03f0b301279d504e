"""The tool-use benchmark through our OpenAI server with the official openai client, against the
same benchmark in process (eval_model.py --bench toolcall).

    python scripts/check_toolcall_openai.py --model out/tool_sft/final [--data tool_test.jsonl]
        [--limit 50] [--tools calculator,convert_units,lookup] [--stream]

The server is scripts/serve_openai_api.py's app, in this process on a free port. Each item runs
the multi-turn loop twice, greedily: through the client (`tools` sent, `tool_calls` received
whole or streamed, executed, `role: tool` messages sent back; evaluation/openai_agent.py) and in
process (tasks/toolcall.py over model.generate). It prints both reports' accuracy and tool
metrics and the items whose verdicts differ. Exit 0 when the accuracies are within 5 points
(greedy on both paths: only batch-shape float noise may split them), else 1. Without --data the
held-out tool items of `python -m dataset.synthetic` (seed 0) are used. A model not trained on
tool conversations (e.g. the quickstart's) runs the loop but rarely calls a tool.
"""
from __future__ import annotations

import argparse
import sys

import openai

from common.errors import run_cli
from dataset.synthetic import tool_test_set
from evaluation.ecosystem import served
from evaluation.openai_agent import run_openai_agent
from evaluation.runner import model_generate_fn
from inference import load_for_inference
from model.generate import SamplingParams
from tasks import toolcall
from tools import default_registry, tool_names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (a tool-trained one)")
    p.add_argument("--data", help="toolcall items (default: the synthetic held-out set)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--tools", default="calculator,convert_units,lookup")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--stream", action="store_true", help="receive tool_calls as streamed deltas")
    args = p.parse_args(argv)
    items = toolcall.load(args.data, args.limit) if args.data else tool_test_set(args.limit)
    registry = default_registry(tool_names(args.tools))
    model, tok = load_for_inference(args.model, None, "cpu", "fp32")
    params = SamplingParams(max_new_tokens=args.max_tokens)
    render = lambda m, t: tok.apply_chat_template(m, tools=t, add_generation_prompt=True)  # noqa: E731
    local = toolcall.run_agent(items, render, model_generate_fn(model, tok, params), registry=registry)
    with served(model, tok, "forge") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        remote = run_openai_agent(client, "forge", items, registry, stream=args.stream,
                                  temperature=0, max_tokens=args.max_tokens)
    accuracy = {}
    for name, rows in (("in process", local), ("openai client", remote)):
        s = toolcall.summarize(rows)
        accuracy[name] = sum(r["correct"] for r in rows) / max(len(rows), 1)
        print(f"{name:>14}: accuracy {accuracy[name]:.3f}, " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    differ = [a["id"] for a, b in zip(local, remote) if a["correct"] != b["correct"]]
    print(f"{len(items)} items, {len(differ)} with different verdicts: {differ[:10]}")
    ok = abs(accuracy["in process"] - accuracy["openai client"]) <= 0.05
    print("PASSED" if ok else "FAILED", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run_cli(main)
