"""trainer/agent.py and train_agent.py: multi-turn rollouts on a scripted model (pause at a tool
call, execute, append the result, resume), the loss mask (the model's own tokens only, checked
against the chat template's rendering of the same conversation), the tool rewards and metrics,
and the stage through the loop (LoRA, bit-exact resume)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from perf.agent import force_replies, reply_chains
from tests.scripted_model import scripted_model
from tools import default_registry
from trainer import rewards
from trainer.agent import AgentPromptDataset, AgentRollouts, sample_agent_groups, tool_turn_ids
from trainer.losses import token_logps
from trainer.rollout import RolloutSettings

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234 * 5678"}}\n</tool_call>'
ITEM = {"question": "What is 1234 * 5678?", "answer": "7006652", "tools": ["calculator"]}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir()


def _record():
    return {"messages": [{"role": "user", "content": ITEM["question"]}], "task": "toolcall",
            "gold": ITEM["answer"], "tools": ITEM["tools"]}


def test_rollout_pauses_executes_resumes_and_masks_the_tool_result(tok):
    registry = default_registry(["calculator"])  # a prompt that fits the tiny preset
    prompts = AgentPromptDataset([_record()], tok, 400, registry)
    call, answer = tok.encode(CALL) + [tok.eos_id], tok.encode("#### 7006652") + [tok.eos_id]
    model = scripted_model([], tok.eos_id, turns=[call, answer])
    settings = RolloutSettings(group_size=2, max_new_tokens=60)
    ro, finals, facts = sample_agent_groups(model, prompts.prompt_ids, settings, 0, tok, registry, 3)
    assert finals == ["#### 7006652"] * 2 and all(ro.finished)
    assert facts[0] == {"tool_calls": 1, "invalid_calls": 0, "tool_failures": 0, "unbalanced_tags": 0,
                        "turns": 2}
    # Reference: the chat template's rendering of the finished conversation, tokens for tokens.
    conv = [{"role": "user", "content": ITEM["question"]}, {"role": "assistant", "content": CALL},
            {"role": "tool", "content": "7006652"}, {"role": "assistant", "content": "#### 7006652"}]
    text = tok.apply_chat_template(conv, tools=registry.schemas())
    want = tok.encode(text.rstrip("\n"))
    row = ro.input_ids[0].tolist()
    assert row[:len(want)] == want
    # The mask: exactly the two replies (each with its stop token), nothing of the tool turn.
    supervised = [row[t + 1] for t in range(len(row) - 1) if ro.action_mask[0, t] == 1]
    assert supervised == call + answer
    assert tok.decode([row[t + 1] for t in range(len(prompts.prompt_ids[0]) - 1, len(row) - 1)
                       if ro.action_mask[0, t] == 0]).count("7006652") == 1  # the result: unmasked
    assert tool_turn_ids(tok, ["7006652"]) == row[len(prompts.prompt_ids[0]) + len(call):
                                                   len(row) - len(answer)]


def test_kept_cache_equals_reprefill_and_a_full_forward(tok):
    """Ragged rows (1, 2 and 3 replies; different prompt lengths and pause points), greedy: the
    kept-cache rollout and the re-prefill one give the same tokens, and the log-probs each
    recorded equal a plain full forward's over the final sequences."""
    registry = default_registry(["calculator"])
    questions = ["What is 1234 * 5678?", "Compute 4321 * 8765 for me, please, exactly.",
                 "Hi, what is 2 + 2? Think about it."]
    records = [{**_record(), "messages": [{"role": "user", "content": q}]} for q in questions]
    prompts = AgentPromptDataset(records, tok, 400, registry)
    call = tok.encode(CALL) + [tok.eos_id]
    call2 = tok.encode(CALL.replace("1234 * 5678", "7006652 + 1")) + [tok.eos_id]
    # Forced replies (perf.agent.force_replies: by position and input token, so every path
    # forces alike); a row's last reply is free, but for the third row's short answer: the first
    # two rows then pause at the same, last step of turn 1, whose stop tokens are never fed.
    results = [tool_turn_ids(tok, ["7006652"]), tool_turn_ids(tok, ["7006653"])]
    scripts = [[(call, results[0])], [(call, results[0]), (call2, results[1])],
               [(tok.encode("#### 4") + [tok.eos_id], [])]]
    assert len({len(p) for p in prompts.prompt_ids}) == 3
    torch.manual_seed(0)
    # Untied: a tied random head mostly repeats the input token, with log-probs near 0.
    model = MiniMindLM(MiniMindConfig.from_preset("tiny", tie_word_embeddings=False)).eval()
    force_replies(model, reply_chains(prompts.prompt_ids, scripts))
    settings = RolloutSettings(group_size=1, max_new_tokens=48, top_p=1e-9)  # = greedy
    runs = {keep: sample_agent_groups(model, prompts.prompt_ids, settings, 0, tok, registry, 3,
                                      keep_cache=keep) for keep in (True, False)}
    (kept, _, facts), (again, _, _) = runs[True], runs[False]
    assert [f["turns"] for f in facts] == [2, 3, 1] and [f["tool_calls"] for f in facts] == [1, 2, 0]
    assert torch.equal(kept.input_ids, again.input_ids)
    assert torch.equal(kept.action_mask, again.action_mask)
    with torch.no_grad():
        ref = token_logps(model(kept.input_ids).logits, kept.input_ids) * kept.action_mask
    free = kept.action_mask.bool() & (ref < -1e-3)    # where the random model chose
    assert free.sum() > 50
    torch.testing.assert_close(kept.logps, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(again.logps, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="forward hooks"):   # a scripted model cannot keep it
        sample_agent_groups(scripted_model([], tok.eos_id), prompts.prompt_ids, settings, 0, tok,
                            registry, 1, keep_cache=True)


def test_rewards_and_metrics_of_agent_rollouts(tok):
    registry = default_registry(["calculator"])  # a prompt that fits the tiny preset
    prompts = AgentPromptDataset([_record()], tok, 400, registry)
    # Turn 1: a call of an unknown tool and one the tool refuses; turn 2 repeats them and is cut
    # by the context (512) inside its second block: no answer, an open tag, nothing executed.
    bad = ('<tool_call>\n{"name": "calc", "arguments": {}}\n</tool_call>\n'
           '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1/0"}}\n</tool_call>')
    model = scripted_model([], tok.eos_id, turns=[tok.encode(bad) + [tok.eos_id]])
    mix = rewards.RewardMix.from_spec("correctness:1.0,tool_format:0.5,tool_count:0.25")
    ro = AgentRollouts(prompts, mix, RolloutSettings(group_size=2, max_new_tokens=100), tok,
                       registry=registry, max_turns=2)
    batch = ro(model, [0], step=0, micro=0)
    m = batch.metrics
    assert m["tool_call_frequency"] == 2 and m["turns"] == 2 and m["truncated"] == 1.0
    assert m["invalid_call_rate"] == 0.5 and m["tool_failure_rate"] == 1.0
    assert batch.samples[0]["unbalanced_tags"] == 1
    assert m["reward/correctness"] == 0 and m["reward/tool_format"] == 0 and m["reward/tool_count"] == 0
    assert batch.samples[0]["completion"] == "" and batch.samples[0]["tool_calls"] == 2
    good = {"tool_calls": 1, "invalid_calls": 0, "unbalanced_tags": 0, "tools": ["calculator"]}
    assert rewards.tool_format_reward("", good) == 1.0 and rewards.tool_count_reward("", good) == 1.0
    assert rewards.tool_count_reward("", {"tool_calls": 1, "tools": []}) == 0.0  # a distractor
    assert rewards.tool_format_reward("", {**good, "unbalanced_tags": 1}) == 0.0


def _run_stage(tmp_path, monkeypatch, out, *extra):
    """train_agent.main on a tiny fresh model, rewarded for a last reply that starts with a space
    (~14 % of the shipped tokenizer's tokens do), so the advantages are not all zero."""
    import train_agent
    monkeypatch.setitem(rewards.REWARDS, "space", lambda text, sample: float(text.startswith(" ")))
    data = tmp_path / "items.jsonl"
    if not data.exists():
        rows = [{"question": f"What is {a * 1111} * {b * 1111}?", "answer": str(a * b * 1111 ** 2),
                 "tools": ["calculator"]} for a in range(1, 4) for b in range(1, 3)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.from_dir()
    monkeypatch.setattr(train_agent, "load_tokenizer", lambda cfg: tok)
    argv = ["--data_path", str(data), "--out_dir", str(out), "--model_preset", "tiny",
            "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "4", "--seq_len", "400",
            "--max_turns", "2", "--tools", "calculator", "--reward", "space,tool_format:0.1",
            "--log_every", "1", "--no-progress", "--no-plot",
            "--dtype", "fp32", "--seed", "3", "--peak_tflops", "1", "--lr", "1e-3", *extra]
    monkeypatch.setattr("sys.argv", ["train_agent.py", *argv])
    train_agent.main()
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_stage_resumes_bit_exactly_with_lora(tmp_path, monkeypatch):
    args = ("--max_steps", "2", "--finetuning_type", "lora")
    full = _run_stage(tmp_path, monkeypatch, tmp_path / "full", *args)
    _run_stage(tmp_path, monkeypatch, tmp_path / "part", *args, "--save_every", "1", "--keep_last", "5")
    half = tmp_path / "part" / "checkpoints" / "step_000001"
    resumed = _run_stage(tmp_path, monkeypatch, tmp_path / "part", *args, "--resume", str(half))
    files = sorted(p.name for p in (tmp_path / "full" / "final").iterdir())
    weights = next(f for f in files if f.endswith(".safetensors"))
    a = load_file(tmp_path / "full" / "final" / weights)
    b = load_file(tmp_path / "part" / "final" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)  # the adapters did train
    assert [m["reward"] for m in full][-1] == resumed[-1]["reward"]
    for key in ("tool_call_frequency", "tool_failure_rate", "invalid_call_rate", "turns", "reward"):
        assert key in full[-1], key
