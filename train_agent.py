"""Multi-turn agent RL: GRPO / DAPO / CISPO on conversations that call tools.

    python train_agent.py --init_from out/tool_sft/final --data_path data/syn/tool_train.jsonl
    python train_agent.py ... --reward correctness:1.0,tool_format:0.2,tool_count:0.2 --max_turns 3
    python train_agent.py ... --finetuning_type lora          # adapters; KL reference = adapters off
    torchrun --nproc_per_node=2 train_agent.py ...             # each rank rolls out its own prompts

Prompts: tool-use items (`{"question", "answer", "tools"}`, e.g. `python -m dataset.synthetic`'s
tool split as `tasks.toolcall` items), rendered with the tool list of `tools.default_registry()`.
Each step samples group_size multi-turn rollouts per prompt (trainer/agent.py: reply, run the
calls, append the results, resume, up to max_turns replies), scores the last reply and the calls
(trainer/rewards.py) and updates with trainer/grpo.py's losses on the model's own tokens only.
Logged besides train_grpo.py's metrics: tool_call_frequency, tool_failure_rate,
invalid_call_rate, turns.

Defaults: train_grpo.py's, with the rewards upstream MiniMind's train_agent.py gives (the answer,
balanced well-formed calls, the right number of calls) and 3 turns, as upstream.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import run_cli
from tools import default_registry, tool_names
from trainer import distributed as dist
from trainer import grpo
from trainer.agent import AgentPromptDataset, AgentRollouts
from trainer.config import option, parse_config
from trainer.rewards import RewardMix
from trainer.stage import build_model, finish, load_tokenizer


@dataclass
class AgentConfig(grpo.GRPOConfig):
    out_dir: str = "out/agent"
    reward: str = option("correctness:1.0,tool_format:0.2,tool_count:0.2",
                         "rewards and weights: correctness, format, length, tool_format, tool_count")
    max_turns: int = option(3, "model replies per rollout (tool calls pause it in between)")
    tools: str = option("calculator,convert_units,lookup",
                        "the built-in tools offered (their list is part of every prompt: all three "
                        "take ~720 tokens, the calculator alone ~260)")

    def _problems(self) -> list[str]:
        err = super()._problems()
        if self.max_turns < 1:
            err.append(f"max_turns must be >= 1, got {self.max_turns}")
        try:
            default_registry(self.tool_names())
        except ValueError as exc:
            err.append(f"tools: {exc}")
        return err

    def tool_names(self) -> list[str]:
        return tool_names(self.tools)


def main() -> None:
    cfg = parse_config(AgentConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    tokenizer = load_tokenizer(cfg)
    registry = default_registry(cfg.tool_names())
    records, skipped = grpo.load_prompts(cfg.data_path, cfg.dataset_dir, cfg.seed)
    prompts = AgentPromptDataset(records, tokenizer, cfg.seq_len - cfg.max_new_tokens, registry, cfg.think)
    if env.is_main:
        print(f"[data] {len(prompts)} prompts with gold answers ({skipped} records without one skipped)",
              flush=True)
    model = build_model(cfg, tokenizer).to(env.device)
    rollouts = AgentRollouts(prompts, RewardMix.from_spec(cfg.reward), cfg.settings().rollout, tokenizer,
                             grpo.policy_reference(cfg, model, env), seed=cfg.seed,
                             rank=env.rank, registry=registry, max_turns=cfg.max_turns,
                             enable_thinking=cfg.think)
    result = grpo.fit_rollouts(model, prompts, rollouts, cfg, env, tokenizer)
    finish(model, cfg, env, result, adapter=cfg.use_lora)


if __name__ == "__main__":
    run_cli(main)
