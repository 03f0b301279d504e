"""Tool use measured on held-out problems (issue 30, item 5): the plain SFT model answering in its
head, the model after tool SFT, and after agent RL from a partway tool-SFT checkpoint, for several
seeds; plus the rollout timing of trainer/agent.py with the KV cache kept across tool pauses
against re-prefilling every row at each turn.

    python scripts/compare_agent.py [--seeds 0 1] [--scale default|smoke] [--out out/compare_agent]
    python scripts/compare_agent.py --rollout_speed [--model DIR]     # the timing alone

What it runs (every stage a subprocess of the command a user would type, from the repo root):

1. Once: `scripts/quickstart.py --until sft` (generated data, a tokenizer trained on it, the
   quickstart's model pretrained and SFT-trained on arithmetic word problems): the plain SFT
   model. Then `python -m dataset.synthetic --tools TOOLS` for the tool split (tool_sft.jsonl:
   4-6 digit products solved by a calculator call, and distractors that need no tool;
   tool_test.jsonl: held-out items whose questions never occur in training) and
   `python -m tasks.toolcall convert` for the RL prompts (items of tool_sft.jsonl).
2. Per seed: tool SFT (`train_full_sft.py --packing` on tool_sft.jsonl from the plain SFT model,
   a checkpoint at `--early` steps), then agent RL (`train_agent.py`, CISPO with
   correctness + tool_format + tool_count rewards, up to 3 turns) from that partway checkpoint.
3. Scoring: `eval_model.py --bench toolcall` on tool_test.jsonl, greedy, the real multi-turn tool
   loop: the plain SFT model offered no tools (`--tools none`: it answers in its head), every
   other model offered `--tools`. Reported per model and seed: answer accuracy overall and on
   the large-number (multiply) items, valid-call rate (parsable, known tool, schema-valid
   arguments, over all calls), right-tool rate (items needing tools whose calls named exactly
   those), unnecessary-call rate (distractors with any call), mean turns. Agent RL's paired gain
   over its start (the partway checkpoint), item by item: `evaluation.compare`'s one-sided exact
   sign test, per seed and pooled over seeds.
4. The rollout timing (`--rollout_speed`, also run once on seed 0's tool-SFT model in a full
   run): `trainer.agent.sample_agent_groups` on the same held-out prompts and seeds, cache kept
   and re-prefilled, each timed after a warm-up; the tokens must agree (greedy). Without a trained
   model (`--rollout_speed` alone) it times a fresh `--preset` model whose replies are scripted:
   a calculator call forced through its logits for `--script_calls` turns, then a free reply; the
   two paths run the same forwards, so the timing is the mechanics, not a model's choices.

The calculator alone by default: the full tool list costs ~720 prompt tokens with the shipped
tokenizer (more with the quickstart's 2048-token one), so tool SFT rows and rollouts would cost
~2-3x as much; `--tools calculator,convert_units,lookup` measures them all (seq_len 1024 then).
Small on purpose (a 2-core CPU): the figures say what tools and RL do to a ~1M-parameter model in
minutes, not what they do at scale.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch

from evaluation.compare import compare_reports, per_item_scores, sign_test
from evaluation.report import read_items
from perf.common import run_stage, with_tokenizer


@dataclass(frozen=True)
class Scale:
    quickstart: str        # scripts/quickstart.py --scale: the plain SFT model
    n_tool_sft: int        # tool-use SFT conversations
    n_tool_test: int       # held-out items
    sft_steps: int         # tool SFT steps (packed rows of seq_len tokens)
    early: int             # the tool-SFT checkpoint agent RL starts from
    rl_steps: int
    rl_prompts: int        # prompts per RL step, each rolled out group_size times
    group_size: int
    batch_size: int        # tool SFT rows per step
    seq_len: int           # tool SFT rows; RL prompt + reply budget
    max_new_tokens: int    # per reply, in RL and scoring


SCALES = {
    # Tool SFT: 300 packed steps of 4 x 1024 tokens (~2 conversations a row: ~0.8 epoch);
    # RL: 40 steps of 4 prompts x 8 from step 100, where tool SFT is partway.
    "default": Scale("default", n_tool_sft=3000, n_tool_test=200, sft_steps=300, early=100,
                     rl_steps=40, rl_prompts=4, group_size=8, batch_size=4, seq_len=1024,
                     max_new_tokens=80),
    "smoke": Scale("smoke", n_tool_sft=200, n_tool_test=12, sft_steps=4, early=2, rl_steps=2,
                   rl_prompts=2, group_size=2, batch_size=2, seq_len=512, max_new_tokens=24),
}
MODELS = ("plain SFT, no tools", "tool SFT", "agent RL start", "agent RL")


def evaluate(model: Path, out: Path, test: Path, tools: str, a: argparse.Namespace) -> dict:
    """eval_model.py --bench toolcall (greedy) into `out`; the row of the table."""
    if not (out / "toolcall.summary.json").exists():
        run_stage("eval_model.py", "--model", str(model), "--bench", "toolcall", "--data",
            f"toolcall={test}", "--tools", tools, "--out", str(out), "--batch_size", "64",
            "--max_new_tokens", str(SCALES[a.scale].max_new_tokens))
    s = json.loads((out / "toolcall.summary.json").read_text())
    meta = s["meta"]
    big = s["per_category"].get("multiply", {}).get("accuracy")
    return {"accuracy": s["accuracy"], "large_numbers": big, "valid_calls": meta["valid_call_rate"],
            "right_tool": meta["right_tool_rate"], "unnecessary_calls": meta["unnecessary_call_rate"],
            "turns": meta["mean_turns"], "report": str(out)}


def prepare(out: Path, a: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(the plain SFT model, the tool data folder, the RL items), built once and kept in `out`."""
    s = SCALES[a.scale]
    base = out / "base"
    sft = base / "sft" / "final"
    if not (sft / "config.json").exists():
        run_stage("scripts/quickstart.py", "--scale", s.quickstart, "--until", "sft", "--seed", "0",
            "--out", str(base))
    data = out / "tool_data"
    if not (data / "tool_test.jsonl").exists():
        run_stage("-m", "dataset.synthetic", "--out", str(data), "--tools", a.tools, "--seed", "0",
            "--n_pretrain", "10", "--n_sft", "10", "--n_dpo", "10", "--n_test", "10",
            "--n_tool_sft", str(s.n_tool_sft), "--n_tool_test", str(s.n_tool_test))
    items = data / "rl_items.jsonl"
    if not items.exists():
        run_stage("-m", "tasks.toolcall", "convert", "--src", str(data / "tool_sft.jsonl"),
            "--out", str(items), "--kind", "eval")
    return sft, data, items


def seed_runs(seed: int, sft: Path, data: Path, items: Path, out: Path,
              a: argparse.Namespace) -> dict[str, dict]:
    """Tool SFT and agent RL of one seed, each scored; {model: row}."""
    s, tokenizer = SCALES[a.scale], sft.parents[1] / "tokenizer"
    test = data / "tool_test.jsonl"
    common = ["--tokenizer_dir", str(tokenizer), "--seed", str(seed), "--no-progress", "--no-plot"]
    tool_dir, rl_dir = out / f"tool_sft_s{seed}", out / f"agent_rl_s{seed}"
    rows: dict[str, dict] = {}
    seconds = {}
    if not (tool_dir / "final" / "config.json").exists():
        seconds["tool SFT"] = run_stage(
            "train_full_sft.py", "--init_from", str(sft), "--packing", "--data_path",
            str(data / "tool_sft.jsonl"), "--seq_len", str(s.seq_len), "--batch_size",
            str(s.batch_size), "--max_steps", str(s.sft_steps), "--lr", "2e-3",
            "--warmup_steps", str(max(1, s.sft_steps // 50)), "--save_every", str(s.early),
            "--keep_last", str(-(-s.sft_steps // s.early)), "--log_every",
            str(max(1, s.sft_steps // 20)), "--out_dir", str(tool_dir), *common)
    tool = with_tokenizer(tool_dir / "final", tokenizer)
    early = with_tokenizer(tool_dir / "checkpoints" / f"step_{s.early:06d}", tokenizer)
    if not (rl_dir / "final" / "config.json").exists():
        seconds["agent RL"] = run_stage(
            "train_agent.py", "--init_from", str(early), "--data_path", str(items),
            "--tools", a.tools, "--max_turns", "3", "--group_size", str(s.group_size),
            "--batch_size", str(s.rl_prompts), "--max_new_tokens", str(s.max_new_tokens),
            "--seq_len", str(s.seq_len), "--max_steps", str(s.rl_steps), "--lr", str(a.rl_lr),
            "--betas", "0.9", "0.999", "--warmup_steps", str(min(5, s.rl_steps)),
            "--temperature", "1.0", "--no-track_kl", "--log_every", str(max(1, s.rl_steps // 10)),
            "--out_dir", str(rl_dir), *common)
    rl = with_tokenizer(rl_dir / "final", tokenizer)
    for name, model in (("tool SFT", tool), ("agent RL start", early), ("agent RL", rl)):
        rows[name] = evaluate(model, model.parent / "eval_toolcall" if name != "agent RL start"
                              else tool_dir / "eval_early", test, a.tools, a)
    rows["agent RL"]["vs_start"] = compare_reports(rows["agent RL start"]["report"],
                                                   rows["agent RL"]["report"])
    rows["seconds"] = seconds
    return rows


def pooled_sign_test(runs: list[dict[str, dict]]) -> dict:
    """Agent RL against its start over every seed's items together (one-sided exact sign test)."""
    before, after = [], []
    for r in runs:
        before += per_item_scores(read_items(Path(r["agent RL start"]["report"]) / "toolcall.items.jsonl"))[1]
        after += per_item_scores(read_items(Path(r["agent RL"]["report"]) / "toolcall.items.jsonl"))[1]
    return {"items": len(before), "before": mean(before), "after": mean(after),
            **sign_test(before, after)}


# ---------------------------------------------------------------------- rollout timing
def reply_chains(rows: list[list[int]], scripts: list[list[tuple[list[int], list[int]]]]
                 ) -> dict[tuple[int, int], int]:
    """The forcing table of `force_replies`: row r's replies are scripts[r] = [(reply, tokens
    after it (the tool turn)), ...]; each reply token is keyed by (position, token before it)."""
    chains: dict[tuple[int, int], int] = {}
    for row, script in zip(rows, scripts):
        seq = list(row)
        for reply, tail in script:
            for t in reply:
                key = (len(seq) - 1, seq[-1])
                if chains.setdefault(key, t) != t:
                    raise ValueError(f"two rows' scripts clash at position {key[0]}")
                seq.append(t)
            seq += tail
    return chains


def force_replies(model: torch.nn.Module, chains: dict[tuple[int, int], int]) -> None:
    """Forces the next token wherever (position, input token) is a key of `chains` (+1e3 on its
    logit), through hooks on the embedding, RoPE and lm_head: a prefill, a static-cache decode
    step and a full forward all force alike (a hook on the model itself would keep it off the
    static decode step). Elsewhere the model chooses."""
    seen: dict[str, torch.Tensor] = {}
    model.model.embed_tokens.register_forward_pre_hook(lambda m, args: seen.update(ids=args[0]))
    model.model.rotary.register_forward_pre_hook(lambda m, args: seen.update(pos=args[0]))

    def force(module, args, out):
        ids = seen["ids"]
        pos = seen["pos"].expand(ids.shape)
        kept = out.shape[1]                   # a forward keeps the last positions' logits
        for b in range(ids.shape[0]):
            for s in range(kept):
                t = ids.shape[1] - kept + s
                forced = chains.get((int(pos[b, t]), int(ids[b, t])))
                if forced is not None:
                    out[b, s, forced] += 1e3
        return out

    model.lm_head.register_forward_hook(force)


def rollout_speed(a: argparse.Namespace, model_dir: Path | None, test: Path | None) -> dict:
    """Seconds of `sample_agent_groups` with the cache kept and re-prefilled (same prompts and
    seeds, one warm-up each), and whether both produced the same tokens."""
    from model.config import MiniMindConfig
    from model.io import load_pretrained
    from model.model import MiniMindLM
    from model.tokenizer import Tokenizer
    from tasks import toolcall
    from tools import default_registry, tool_names
    from trainer.agent import AgentPromptDataset, sample_agent_groups, tool_turn_ids
    from trainer.rollout import RolloutSettings

    registry = default_registry(tool_names(a.tools))
    tok = Tokenizer.from_dir(str(model_dir) if model_dir else None)
    if test is not None:
        questions = [it["question"] for it in toolcall.load(test)][:a.speed_prompts]
    else:
        questions = [f"What is {1234 + 1111 * i} * {5678 + 7 * i}?" for i in range(a.speed_prompts)]
    records = [{"messages": [{"role": "user", "content": q}]} for q in questions]
    if model_dir is not None:
        model = load_pretrained(model_dir).float().eval()
        what = str(model_dir)
    else:
        torch.manual_seed(0)
        model = MiniMindLM(MiniMindConfig.from_preset(a.preset, tie_word_embeddings=False)).eval()
        what = f"fresh {a.preset}, {a.script_calls} scripted calculator call(s) per row"
    context = model.config.max_position_embeddings
    prompts = AgentPromptDataset(records, tok, context - 3 * a.speed_tokens, registry)
    if model_dir is None:
        call = tok.encode('<tool_call>\n{"name": "calculator", "arguments": {"expression": '
                          '"1234 * 5678"}}\n</tool_call>') + [tok.eos_id]
        tail = tool_turn_ids(tok, ["7006652"])
        script = [(call, tail)] * a.script_calls
        force_replies(model, reply_chains(prompts.prompt_ids, [script] * len(prompts.prompt_ids)))
    settings = RolloutSettings(group_size=a.speed_group, max_new_tokens=a.speed_tokens,
                               temperature=1.0, top_p=1e-9)   # top_p ~0: greedy, comparable
    if a.threads:
        torch.set_num_threads(a.threads)
    times, outs = {}, {}
    for keep in (True, False, True, False):   # interleaved: drift on a shared machine hits both
        t0 = time.perf_counter()
        outs[keep] = sample_agent_groups(model, prompts.prompt_ids, settings, 0, tok, registry,
                                         3, keep_cache=keep)
        times.setdefault(keep, []).append(time.perf_counter() - t0)
    kept, again = outs[True], outs[False]
    facts = kept[2]
    result = {"model": what, "rows": len(facts), "prompt_tokens": mean(len(p) for p in prompts.prompt_ids),
              "turns": mean(f["turns"] for f in facts), "calls": mean(f["tool_calls"] for f in facts),
              "tokens": int(kept[0].input_ids.ne(tok.pad_id).sum()),
              "kept_s": min(times[True][1:]), "reprefill_s": min(times[False][1:]),
              "same_tokens": bool(torch.equal(kept[0].input_ids, again[0].input_ids)),
              "threads": torch.get_num_threads()}
    result["speedup"] = result["reprefill_s"] / result["kept_s"]
    print(f"\nrollout of {result['rows']} rows ({what}): prompt {result['prompt_tokens']:.0f} tokens, "
          f"{result['turns']:.2f} turns, {result['calls']:.2f} calls per row; cache kept "
          f"{result['kept_s']:.2f} s, re-prefill {result['reprefill_s']:.2f} s "
          f"({result['speedup']:.2f}x); same tokens: {result['same_tokens']}", flush=True)
    return result


# ---------------------------------------------------------------------- entry point
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/compare_agent", help="working folder (reused: stages "
                    "already there are not run again)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--scale", choices=sorted(SCALES), default="default",
                    help="default: the measurement (~25 min on a 2-core CPU); smoke: a dry run")
    ap.add_argument("--tools", default="calculator", help="the tools offered and needed")
    ap.add_argument("--rl_lr", type=float, default=1e-4)
    g = ap.add_argument_group("rollout timing")
    g.add_argument("--rollout_speed", action="store_true", help="only time the rollouts")
    g.add_argument("--model", help="a tool-trained model folder (default: a scripted fresh one)")
    g.add_argument("--data", help="held-out items for --model's prompts (tool_test.jsonl)")
    g.add_argument("--preset", default="demo-small")
    g.add_argument("--script_calls", type=int, default=2, help="scripted calls per row")
    g.add_argument("--speed_prompts", type=int, default=8)
    g.add_argument("--speed_group", type=int, default=4)
    g.add_argument("--speed_tokens", type=int, default=64, help="max new tokens per reply")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    out = Path(a.out).resolve()
    if a.rollout_speed:
        model = Path(a.model) if a.model else None
        result = rollout_speed(a, model, Path(a.data) if a.data else None)
        out.mkdir(parents=True, exist_ok=True)
        from common.atomic import atomic_write_text
        atomic_write_text(out / "rollout_speed.json", json.dumps(result, indent=2) + "\n")
        return
    t0 = time.perf_counter()
    sft, data, items = prepare(out, a)
    test = data / "tool_test.jsonl"
    plain = evaluate(sft, out / "eval_plain_sft", test, "none", a)
    runs = [seed_runs(seed, sft, data, items, out, a) for seed in a.seeds]
    speed = rollout_speed(a, out / "tool_sft_s0" / "final", test) if 0 in a.seeds else None
    report(plain, runs, pooled_sign_test(runs), speed, time.perf_counter() - t0, out, a)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def report(plain: dict, runs: list[dict], pooled: dict, speed: dict | None, seconds: float,
           out: Path, a: argparse.Namespace) -> None:
    s = SCALES[a.scale]
    print(f"\nheld-out tool items: {s.n_tool_test} ({a.tools}); seeds {' '.join(map(str, a.seeds))}; "
          f"tool SFT {s.sft_steps} steps, agent RL {s.rl_steps} steps of {s.rl_prompts} x G "
          f"{s.group_size} from tool-SFT step {s.early}; {seconds:.0f} s in all")
    keys = ("accuracy", "large_numbers", "valid_calls", "right_tool", "unnecessary_calls", "turns")
    print(f"{'model':<20} {'seed':>4} " + " ".join(f"{k:>17}" for k in keys))
    lines = [("plain SFT, no tools", "-", plain)] + [
        (name, str(seed), r[name]) for name in MODELS[1:] for seed, r in zip(a.seeds, runs)]
    for name, seed, row in lines:
        cells = [f"{row['turns']:.2f}" if k == "turns" else _pct(row[k]) for k in keys]
        print(f"{name:<20} {seed:>4} " + " ".join(f"{c:>17}" for c in cells))
    for seed, r in zip(a.seeds, runs):
        c = r["agent RL"]["vs_start"]
        print(f"agent RL vs its start, seed {seed}: {c['before']:.1%} -> {c['after']:.1%}, "
              f"{c['better']} better, {c['worse']} worse, {c['ties']} tied, one-sided p = {c['p']:.3g}")
    print(f"pooled over seeds: {pooled['before']:.1%} -> {pooled['after']:.1%}, {pooled['better']} "
          f"better, {pooled['worse']} worse, one-sided sign test p = {pooled['p']:.3g}")
    from common.atomic import atomic_write_text
    atomic_write_text(out / "results.json", json.dumps(
        {"scale": a.scale, "tools": a.tools, "seeds": a.seeds, "plain_sft": plain,
         "runs": runs, "agent_rl_pooled": pooled, "rollout_speed": speed, "seconds": seconds},
        indent=2) + "\n")
    print(f"results: {out / 'results.json'}")
