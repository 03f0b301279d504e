"""trainer/ppo.py and train_ppo.py: GAE, the rewards, the clipped policy and value losses against
hand computations and a naive GAE; the stage through the shared loop: it raises a learnable
reward, resumes bit for bit, trains only adapters and the value head under LoRA (reference =
adapters off), the early stop on KL samples afresh, and it runs under torchrun; out_dir/final is
a plain model folder with the critic beside it."""
import math

import pytest
import torch
from safetensors.torch import load_file

from model.io import load_pretrained
from tests.rl_stage import run_rl_stage
from trainer import ppo, rollout, stage
from trainer.ppo import PPOSettings, gae, masked_whiten, ppo_loss, token_rewards

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def _naive_gae(r, v, mask, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l} over the reply's positions, written out per row (Schulman et al.
    2016, eq. 16), V = 0 after the last one."""
    adv = torch.zeros_like(r)
    for i in range(r.shape[0]):
        pos = [t for t in range(r.shape[1]) if mask[i, t] > 0]
        vals = [float(v[i, t]) for t in pos] + [0.0]
        deltas = [float(r[i, t]) + gamma * vals[k + 1] - vals[k] for k, t in enumerate(pos)]
        for k, t in enumerate(pos):
            adv[i, t] = sum((gamma * lam) ** j * d for j, d in enumerate(deltas[k:]))
    return adv


def test_gae_matches_the_sum_formula_and_a_hand_computation():
    torch.manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0.0]])
    r, v = torch.randn(3, 6) * mask, torch.randn(3, 6) * mask
    adv, ret = gae(r, v, mask, 0.9, 0.8)
    assert torch.allclose(adv, _naive_gae(r, v, mask, 0.9, 0.8), atol=1e-6)
    assert torch.allclose(ret, (adv + v) * mask)
    # two reply tokens: r = (0, 1), V = (0.5, 0.2), γ = 0.9, λ = 0.8:
    # δ_1 = 1 - 0.2 = 0.8; δ_0 = 0 + 0.9·0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.72·0.8 = 0.256
    a, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 0.9, 0.8)
    assert a[0].tolist() == pytest.approx([0.256, 0.8])


def test_rewards_are_the_kl_penalty_plus_the_score_on_the_last_reply_token():
    mask = torch.tensor([[0.0, 1, 1, 0], [1, 1, 1, 1]])
    old = torch.log(torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.5, 0.2, 0.3, 0.6]]))
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.4, 0.9], [0.5, 0.2, 0.6, 0.6]]))
    r, kl = token_rewards(torch.tensor([2.0, -1.0]), old, ref, mask, kl_coef=0.1)
    want = [[0.0, -0.1 * math.log(2), 2.0, 0.0], [0.0, 0.0, -0.1 * math.log(0.5), -1.0]]
    assert r.tolist() == [pytest.approx(row) for row in want]
    assert kl[0, 3] == 0 and kl[0, 1] == pytest.approx(math.log(2))   # off the reply: no penalty


def test_ppo_loss_matches_hand_computation():
    """One token with A = +1 and ratio 1.5 (clipped at 1.2: pg = -1.2), one with A = -1 and ratio
    0.5 (clip at 0.8 binds against it: pg = max(0.5, 0.8) = 0.8); the padded third token is out.
    Values: V = 1.0 from V_old = 0.5 with ε_v 0.2 -> the clipped 0.7; R = 2: ½ max(1, 1.69)."""
    s = PPOSettings(cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)
    logps = torch.log(torch.tensor([[0.6, 0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.4, 0.4, 0.9]]))
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    values, old_values = torch.tensor([[1.0, 0.0, 3.0]]), torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, st = ppo_loss(logps, old, values, old_values, adv, returns, mask, s)
    pg = (-1.2 + 0.8) / 2
    vf = (0.5 * max(1.0, 1.3 ** 2) + 0.0) / 2
    assert st["policy_loss"].item() == pytest.approx(pg)
    assert st["value_loss"].item() == pytest.approx(vf)
    assert loss.item() == pytest.approx(pg + 0.5 * vf, abs=1e-6)   # fp32
    assert st["clip_frac"].item() == pytest.approx(1.0) and st["value_clip_frac"].item() == pytest.approx(0.5)
    k3 = ((1.5 - 1) - math.log(1.5) + (0.5 - 1) - math.log(0.5)) / 2
    assert st["approx_kl"].item() == pytest.approx(k3)


def test_masked_whiten_uses_only_the_reply_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[:, 2].abs().max() == 0
    assert w[mask > 0].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[mask > 0].pow(2).mean().item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------- through the loop
def _run_stage(tmp_path, monkeypatch, out, *extra):
    """train_ppo.main on a tiny fresh model, rewarded for starting its answer with a space."""
    import train_ppo
    return run_rl_stage(train_ppo, tmp_path, monkeypatch, out, "--batch_size", "4", "--samples_per_prompt", "2", *extra)


def test_stage_raises_a_learnable_reward(tmp_path, monkeypatch):
    """The reward (answer starts with a space; ~14 % by chance for an untrained model) climbs over
    24 rollouts of 4 prompts x 8 samples, so advantages, the critic and the update direction
    agree. Measured, mean score of the first / last 6 steps: 0.14 -> 1.00 (seed 3), 0.11 -> 1.00
    (seed 4); with 2 epochs per rollout (12 rollouts) 0.08 -> 0.48 and 0.17 -> 0.99."""
    metrics = _run_stage(tmp_path, monkeypatch, tmp_path / "run", "--max_steps", "24", "--lr", "3e-2",
                         "--min_lr_ratio", "1", "--ppo_epochs", "1", "--samples_per_prompt", "8",
                         "--kl_coef", "0")
    first = sum(m["score"] for m in metrics[:6]) / 6
    last = sum(m["score"] for m in metrics[-6:]) / 6
    assert last > first + 0.4, (first, last)
    assert metrics[-1]["value"] != 0     # the critic moved off its zero start


def test_resume_is_bit_exact_and_final_is_a_plain_model_folder(tmp_path, monkeypatch):
    args = ("--max_steps", "4", "--lr", "1e-3", "--ppo_epochs", "2")
    full = _run_stage(tmp_path, monkeypatch, tmp_path / "full", *args)
    _run_stage(tmp_path, monkeypatch, tmp_path / "part", *args, "--save_every", "2", "--keep_last", "5")
    half = tmp_path / "part" / "checkpoints" / "step_000002"
    resumed = _run_stage(tmp_path, monkeypatch, tmp_path / "part", *args, "--resume", str(half))
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = (load_file(tmp_path / d / "final" / name) for d in ("full", "part"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["score"] for m in full] == [m["score"] for m in resumed]
    assert [m["value_loss"] for m in full] == [m["value_loss"] for m in resumed]
    for key in ("score", "kl", "value", "return", "policy_loss", "value_loss", "clip_frac",
                "approx_kl", "entropy", "response_len"):
        assert key in full[-1], key
    policy = load_pretrained(tmp_path / "full" / "final")   # strict: the critic is not in it
    assert not any(k.startswith("v_head") for k in policy.state_dict())
    assert set(load_file(tmp_path / "full" / "final" / "value_head.safetensors")) == {
        "v_head.summary.weight", "v_head.summary.bias"}


def test_lora_trains_adapters_and_value_head_only(tmp_path, monkeypatch):
    """Reference = the policy with its adapters off: kl is 0 on the first rollout (B = 0)."""
    import train_ppo
    built, done = {}, {}

    def build(cfg, tok):
        model = real_build(cfg, tok)
        built.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    real_build = stage.build_model
    monkeypatch.setattr(stage, "build_model", build)
    monkeypatch.setattr(train_ppo, "finish", lambda model, *a, **k: done.setdefault(   # what is exported
        "state", {k: v.detach().clone() for k, v in model.state_dict().items()}))
    metrics = _run_stage(tmp_path, monkeypatch, tmp_path / "lora", "--finetuning_type", "lora",
                         "--lora_rank", "4", "--max_steps", "4", "--ppo_epochs", "1", "--lr", "1e-2")
    assert abs(metrics[0]["kl"]) < 1e-7 and metrics[-1]["kl"] > 1e-6, [m["kl"] for m in metrics]
    head = load_file(tmp_path / "lora" / "final" / "value_head.safetensors")
    assert head["v_head.summary.weight"].abs().sum() > 0          # the critic trained
    after = done["state"]
    assert after.keys() == built.keys()                          # the head was detached for the export
    adapters = [k for k in after if k.endswith(("lora_A", "lora_B"))]
    for k, v in after.items():
        assert torch.equal(v, built[k]) != (k in adapters), k    # adapters moved, nothing else did


def test_early_stop_samples_afresh_after_the_kl_limit(tmp_path, monkeypatch):
    """ppo_epochs 4: without early stop one rollout per 4 steps. With a tiny target_kl the
    second update on a rollout passes the limit (the first has ratio 1: KL 0), so the step after
    it samples afresh: rollouts at steps 1 and 3."""
    calls = []
    real = rollout.sample_groups

    def sample_groups(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(rollout, "sample_groups", sample_groups)
    _run_stage(tmp_path, monkeypatch, tmp_path / "a", "--max_steps", "4", "--lr", "1e-2", "--kl_coef", "0")
    assert len(calls) == 1
    calls.clear()
    metrics = _run_stage(tmp_path, monkeypatch, tmp_path / "b", "--max_steps", "4", "--lr", "1e-2",
                         "--kl_coef", "0", "--target_kl", "1e-6")
    assert len(calls) == 2 and [m["early_stop"] for m in metrics] == [0.0, 1.0, 0.0, 1.0]


def test_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="ppo_epochs"):
        PPOSettings(ppo_epochs=0)
    with pytest.raises(ValueError, match="gamma"):
        PPOSettings(gamma=1.5)
    assert ppo.PPOSettings().rollout.group_size == 1


def test_rl_stages_refuse_fsdp_in_one_line():
    """Each rank's rollouts run a different number of forwards: a sharded model cannot."""
    import train_ppo
    from common.errors import UserError
    from trainer.config import parse_config
    from trainer.grpo import GRPOConfig
    for cls, name in ((train_ppo.PPOConfig, "PPO"), (GRPOConfig, "GRPO")):
        with pytest.raises(UserError, match=f"parallel fsdp: {name}'s rollouts"):
            parse_config(cls, ["--parallel", "fsdp", "--data_path", "x.jsonl", "--device", "cpu"])


def test_two_ranks_under_torchrun(tmp_path):
    """torchrun, 2 processes: each rank rolls out its own prompts, the policy and the critic train
    under DDP (the value head is added before the loop wraps the model, so its gradients are
    all-reduced too), early stop on KL included; rank 0 writes the policy and its critic."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train_ppo.py", "--data_path", str(data), "--model_preset", "tiny", "--device", "cpu",
         "--batch_size", "2", "--max_new_tokens", "3", "--seq_len", "64", "--reward", "length",
         "--ppo_epochs", "2", "--target_kl", "1e-6", "--kl_coef", "0.05", "--max_steps", "4",
         "--lr", "1e-2", "--log_every", "1", "--no-progress", "--no-plot", "--dtype", "fp32",
         "--seed", "3", "--peak_tflops", "1", "--out_dir", str(out)],
        cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)},
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "world 2," in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["early_stop"] for m in metrics] == [0.0, 1.0, 0.0, 1.0]
    head = load_file(out / "final" / "value_head.safetensors")
    assert head["v_head.summary.weight"].abs().sum() > 0
    load_pretrained(out / "final")
