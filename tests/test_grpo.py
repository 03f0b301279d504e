"""trainer/grpo.py, trainer/rollout.py and train_grpo.py: the three losses and the advantages
against hand computations, the batched rollout against rows decoded alone, and the stage through
the shared loop: it raises a reward a tiny model can learn, and a resumed run matches an
uninterrupted one bit for bit (weights and sampled completions); under torchrun two ranks stay in
step even when every group is dropped."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.config import MiniMindConfig
from model.generate import SamplingParams, generate_tokens
from model.io import load_pretrained
from model.model import MiniMindLM
from tests.rl_stage import run_rl_stage
from trainer import grpo, rollout, stage
from trainer.grpo import GRPOSettings, policy_loss
from trainer.rollout import group_advantages

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")

# Two completions, two token positions; the second row's second position is padding.
# Row 0 (Â = +1): ratios 0.6/0.4 = 1.5 and 1.0; row 1 (Â = -1): ratio 0.2/0.4 = 0.5.
LOGPS = torch.log(torch.tensor([[0.6, 0.5], [0.2, 0.9]]))
OLD = torch.log(torch.tensor([[0.4, 0.5], [0.4, 0.9]]))
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def _loss(kind, eps_low, eps_high, beta=0.0, ref=None, logps=LOGPS):
    s = GRPOSettings(kind, group_size=2, beta=beta, eps_low=eps_low, eps_high=eps_high)
    return policy_loss(logps, OLD, ADV, MASK, s, ref)


def test_grpo_loss_matches_hand_computation():
    # row 0: min(1.5, 1.2) = 1.2 and 1.0 -> mean 1.1; row 1: min(-0.5, -0.8) = -0.8
    loss, stats = _loss("grpo", 0.2, 0.2)
    assert loss.item() == pytest.approx(-(1.1 - 0.8) / 2, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)   # both clipped tokens, of 3
    assert "kl" not in stats      # no reference: no KL is logged (a 0 would plot as a measured KL)


def test_grpo_kl_term_is_k3_per_token():
    ref = torch.log(torch.tensor([[0.3, 0.5], [0.2, 0.1]]))   # ref/π = 0.5, 1, 1 on the real tokens
    k3 = 0.5 - math.log(0.5) - 1.0
    loss, stats = _loss("grpo", 0.2, 0.2, beta=0.1, ref=ref)
    # the per-sequence mean gets +β k3 on row 0's first token only
    assert loss.item() == pytest.approx(-(1.1 - 0.8) / 2 + 0.1 * k3 / 2 / 2, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(k3 / 3, abs=1e-6)


def test_dapo_loss_is_token_level_with_clip_higher():
    # row 0: min(1.5, 1.28) = 1.28 and 1.0; row 1: -0.8; summed over 3 tokens
    loss, _ = _loss("dapo", 0.2, 0.28)
    assert loss.item() == pytest.approx(-(1.28 + 1.0 - 0.8) / 3, abs=1e-6)


@pytest.mark.parametrize("eps_high, w0", [(4.0, 1.5), (0.2, 1.2)])
def test_cispo_loss_and_gradient_use_clipped_detached_weights(eps_high, w0):
    logps = LOGPS.clone().requires_grad_(True)
    loss, stats = _loss("cispo", 1.0, eps_high, logps=logps)
    want = -(w0 * math.log(0.6) + 1.0 * math.log(0.5) - 0.5 * math.log(0.2)) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6)
    loss.backward()
    # REINFORCE: d/d log π = -w Â / Σ|o| for every token, the clipped one included
    torch.testing.assert_close(logps.grad, torch.tensor([[-w0 / 3, -1 / 3], [0.5 / 3, 0.0]]))
    assert stats["clip_frac"].item() == pytest.approx(0.0 if eps_high == 4.0 else 1 / 3)


def test_grpo_clip_removes_the_gradient_of_clipped_tokens():
    logps = LOGPS.clone().requires_grad_(True)
    _loss("grpo", 0.2, 0.2, logps=logps)[0].backward()
    # d/d log π of ρÂ is ρÂ where unclipped (row 0 token 1: ρ = 1, Â = 1, /2 tokens /2 rows)
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.25], [0.0, 0.0]]))


def test_group_advantages_match_hand_computation():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, std = group_advantages(r, 4, eps=0.0)
    # group 1: mean 0.25, sample std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    torch.testing.assert_close(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    torch.testing.assert_close(std, torch.tensor([0.5, 0.0]))
    adv, _ = group_advantages(r, 4)              # eps keeps a flat group at 0, not NaN
    assert adv[4:].abs().max().item() == 0.0
    unscaled, _ = group_advantages(r, 4, scale=False)
    torch.testing.assert_close(unscaled[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_repetition_rate():
    assert rollout.repetition_rate([1, 2, 3, 4, 5, 6], n=2) == 0.0
    assert rollout.repetition_rate([7, 7, 7, 7, 7], n=2) == pytest.approx(3 / 4)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return MiniMindLM(MiniMindConfig.from_preset("tiny", vocab_size=64)).eval()


def test_rollout_batch_equals_rows_decoded_alone():
    """One batched decode over all prompts x G gives each row what it gets alone (same seed), and
    the training batch lines every completion token up with its action mask."""
    model = _tiny()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    s = GRPOSettings("cispo", group_size=3, max_new_tokens=6, temperature=1.0)
    ro = rollout.sample_groups(model, prompts, s.rollout, seed=100, stop_ids=[2], pad_id=0)
    assert len(ro.completions) == 6
    for k, comp in enumerate(ro.completions):
        p = prompts[k // 3]
        params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=100 + k, stop_token_ids=(2,))
        alone = [step[0] for step in generate_tokens(model, [p], [params]) if step[0] is not None]
        assert comp == alone
        assert ro.input_ids[k, :len(p) + len(comp)].tolist() == p + comp
        targets = ro.input_ids[k, 1:][ro.action_mask[k] > 0].tolist()
        assert targets == comp
    assert len({tuple(c) for c in ro.completions[:3]}) > 1     # the group differs


# ---------------------------------------------------------------------- through the loop
def _run_stage(tmp_path, monkeypatch, out, *extra):
    """train_grpo.main on a tiny fresh model, rewarded for starting its answer with a space."""
    import train_grpo
    return run_rl_stage(train_grpo, tmp_path, monkeypatch, out, "--batch_size", "2", "--group_size", "4", *extra)


def test_resume_is_bit_exact_including_rollouts(tmp_path, monkeypatch):
    """DAPO (its group dropping included) with a KL reference, 4 steps straight vs 2 + resume."""
    args = ("--max_steps", "4", "--lr", "1e-3", "--loss", "dapo", "--beta", "0.05")
    full = _run_stage(tmp_path, monkeypatch, tmp_path / "full", *args)
    _run_stage(tmp_path, monkeypatch, tmp_path / "part", *args, "--save_every", "2", "--keep_last", "5")
    half = tmp_path / "part" / "checkpoints" / "step_000002"
    # the rerun from step 2 overwrites steps 3-4 of the same folder
    resumed = _run_stage(tmp_path, monkeypatch, tmp_path / "part", *args, "--resume", str(half))
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "part" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["reward"] for m in full] == [m["reward"] for m in resumed]
    samples = lambda d: (tmp_path / d / "rollouts.jsonl").read_text()   # noqa: E731
    assert samples("full") == samples("part") and samples("full").count("\n") == 4 * 4
    for key in ("reward", "reward_std", "accuracy", "kl", "entropy", "response_len", "clip_frac",
                "frac_groups_dropped", "repetition", "rollout_tok_s", "update_tok_s", "gen_share"):
        assert key in full[-1], key
    # its batches are prompt indices: the loop counts no tokens and logs no throughput of 0
    assert "tokens_per_s" not in full[-1] and "mfu" not in full[-1]


def test_stage_raises_a_learnable_reward(tmp_path, monkeypatch):
    """CISPO through the loop: the reward (answer starts with a space; ~14 % by chance for an
    untrained model) climbs from ~0.1 over the first 5 steps to ~0.9 over the last 5 of 25
    (measured: 0.12 -> 0.90, seed 3), so the update direction and the advantages are right."""
    metrics = _run_stage(tmp_path, monkeypatch, tmp_path / "run", "--max_steps", "25", "--lr", "1e-2",
                         "--min_lr_ratio", "1", "--batch_size", "4", "--group_size", "8",
                         "--no-track_kl")
    first = sum(m["reward"] for m in metrics[:5]) / 5
    last = sum(m["reward"] for m in metrics[-5:]) / 5
    assert last > first + 0.4, (first, last)


def test_entropy_is_the_mean_over_completion_tokens():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1] = torch.tensor([10.0, -10.0, -10.0, -10.0])      # ~one-hot: entropy ~0
    mask = torch.tensor([[1.0, 1.0]])                              # positions 0 (uniform) and 1
    assert grpo.masked_entropy(logits, mask).item() == pytest.approx(math.log(4) / 2, abs=1e-3)
    assert grpo.masked_entropy(logits, torch.zeros(1, 2)).item() == 0.0


def test_lora_reference_is_the_adapter_free_model_and_only_adapters_train(tmp_path, monkeypatch):
    """--finetuning_type lora: the KL reference is the policy with its adapters off, so kl is 0 on
    the first step (B = 0) and grows once the adapters move; every base weight stays bit-equal."""
    import train_grpo
    built, done = {}, {}

    def build(cfg, tok):
        model = train_grpo_build(cfg, tok)
        built.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    train_grpo_build = stage.build_model
    monkeypatch.setattr(stage, "build_model", build)
    monkeypatch.setattr(train_grpo, "finish", lambda model, *a, **k: done.setdefault("model", model))
    metrics = _run_stage(tmp_path, monkeypatch, tmp_path / "lora", "--finetuning_type", "lora",
                         "--lora_rank", "4", "--max_steps", "3", "--lr", "1e-2", "--min_lr_ratio", "1")
    assert abs(metrics[0]["kl"]) < 1e-7 and metrics[-1]["kl"] > 1e-6, [m["kl"] for m in metrics]
    after = done["model"].state_dict()
    adapters = [k for k in after if k.endswith(("lora_A", "lora_B"))]
    assert adapters and after.keys() == built.keys()
    for k, v in after.items():
        assert torch.equal(v, built[k]) != (k in adapters), k   # adapters moved, nothing else did


def test_inner_updates_reuse_the_rollout_with_a_moving_ratio(tmp_path, monkeypatch):
    """μ = 2: one rollout per two optimizer steps; the first step's ratio π_θ/π_old is 1, the
    second's (same completions, updated weights) is not."""
    calls, ratios = [], []
    real_rollout, real_loss = rollout.sample_groups, grpo.policy_loss

    def sample_groups(*a, **k):
        calls.append(len(ratios))
        return real_rollout(*a, **k)

    def loss(logps, old_logps, advantages, mask, *rest):
        ratios.append(((logps - old_logps).exp() - 1).abs()[mask > 0].max().item())
        return real_loss(logps, old_logps, advantages, mask, *rest)

    monkeypatch.setattr(rollout, "sample_groups", sample_groups)
    monkeypatch.setattr(grpo, "policy_loss", loss)
    metrics = _run_stage(tmp_path, monkeypatch, tmp_path / "mu2", "--inner_updates", "2",
                         "--max_steps", "4", "--lr", "1e-2", "--min_lr_ratio", "1", "--batch_size", "4",
                         "--group_size", "8", "--no-track_kl")
    assert calls == [0, 2]                       # rollouts before the 1st and the 3rd update only
    assert all(m["reward_std"] > 0 for m in metrics)   # a signal, so the weights move
    assert ratios[0] < 1e-5 and ratios[2] < 1e-5, ratios
    assert ratios[1] > 1e-3 and ratios[3] > 1e-3, ratios


def test_two_ranks_under_torchrun_stay_in_step_when_every_group_is_flat(tmp_path):
    """torchrun, 2 processes, DAPO on a random model: every reward is 0, so every group is dropped
    on both ranks. Each rank still runs a zero-weight backward (DDP's all-reduce would hang
    otherwise), and the weights come out exactly as a one-process run's: untouched by a zero
    gradient (AdamW, no weight decay). The same launch then runs train_agent.py (multi-turn tool
    rollouts, CISPO): it must finish on both ranks with its metrics and a loadable model."""
    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"question": f"What is {a * 1111} * {b * 1111}?",
                                         "answer": str(a * b * 1111 ** 2), "tools": ["calculator"]})
                             + "\n" for a in range(1, 4) for b in range(1, 3)))
    tiny = ["--model_preset", "tiny", "--device", "cpu", "--log_every", "1", "--no-progress",
            "--no-plot", "--dtype", "fp32", "--seed", "3", "--peak_tflops", "1", "--max_steps", "2"]
    common = ["train_grpo.py", "--data_path", str(data), "--batch_size", "2", "--group_size", "4",
              "--max_new_tokens", "3", "--seq_len", "64", "--loss", "dapo", "--no-track_kl", *tiny]
    agent = ["--then", "train_agent.py", "--data_path", str(items), "--batch_size", "2",
             "--group_size", "2", "--max_new_tokens", "4", "--seq_len", "400", "--max_turns", "2",
             "--tools", "calculator", "--out_dir",
             str(tmp_path / "agent"), *tiny]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    runs = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(repo / "tests" / "stage_chain.py")],
            "one": [sys.executable]}
    for name, launcher in runs.items():
        then = agent if name == "ddp" else []
        proc = subprocess.run([*launcher, *common, "--out_dir", str(tmp_path / name), *then],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        # each stage says its world size: the agent stage ran on both ranks too
        assert proc.stdout.count(f"world {2 if name == 'ddp' else 1},") == (2 if then else 1)
        metrics = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert [m["frac_groups_dropped"] for m in metrics] == [1.0, 1.0]
    a = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    b = load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = [json.loads(line) for line in open(tmp_path / "agent" / "metrics.jsonl")][-1]
    assert last["step"] == 2 and math.isfinite(last["loss"])
    assert {"tool_call_frequency", "tool_failure_rate", "turns"} <= last.keys()
    model = load_pretrained(tmp_path / "agent" / "final")       # strict: every weight there
    assert all(torch.isfinite(p).all() for p in model.parameters())
