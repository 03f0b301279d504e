"""trainer/reward_model.py, train_reward.py and the reward_model:PATH reward: the Bradley–Terry
loss against a hand computation, the score at the last real token checked against the model's own
logits, the stage raising held-out pairwise accuracy on a separable toy set, the folder loading
back (and its body as a plain LM), and GRPO trained on open-ended prompts by a reward model."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dataset import synthetic
from model.config import MiniMindConfig
from model.io import load_pretrained
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from trainer import reward_model as rm
from trainer.rewards import RewardMix, RewardSpecError

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def test_bradley_terry_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    want = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]     # -log σ(d) = log(1 + e^-d)
    torch.testing.assert_close(rm.bradley_terry_loss(chosen, rejected), torch.tensor(want))
    centered = rm.bradley_terry_loss(chosen, rejected, center_coef=0.01)
    torch.testing.assert_close(centered, torch.tensor([want[0] + 0.01 * 1.0, want[1] + 0.0]))


def test_last_scores_take_the_last_real_token():
    values = torch.arange(12.0).view(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert rm.last_scores(values, mask).tolist() == [2.0, 11.0]


def tiny() -> MiniMindLM:
    torch.manual_seed(0)
    return MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0))


def logit_head(model: MiniMindLM, token: int) -> MiniMindLM:
    """A value head equal to the lm_head row of `token`: the value is then that token's logit,
    which a plain forward computes without the hook (an independent check of token_values)."""
    head = rm.add_value_head(model)
    with torch.no_grad():
        head.summary.weight.copy_(model.lm_head.weight[token][None])
    return model


def test_values_are_the_head_on_the_final_hidden_state():
    model = tiny().eval()
    ids = torch.randint(3, 100, (2, 9))
    head = rm.add_value_head(model)
    zero, _ = rm.token_values(model, ids)
    assert zero.shape == (2, 9) and not zero.any()      # a fresh head scores everything 0
    assert rm.add_value_head(model) is head
    values, _ = rm.token_values(logit_head(model, 42), ids)
    torch.testing.assert_close(values, model(ids).logits[..., 42], rtol=1e-5, atol=1e-5)


def toy_pairs(numbers) -> list[dict]:
    """Separable preference pairs: the answer 'yes' is preferred to 'no'."""
    return [{side: [{"role": "user", "content": f"Is {k} a number?"},
                    {"role": "assistant", "content": answer}]
             for side, answer in (("chosen", "yes"), ("rejected", "no"))} for k in numbers]


def run_stage(monkeypatch, argv: list[str], module):
    from trainer import stage
    for owner in (stage, module):   # the RL stages read it through grpo.rl_setup, i.e. from stage
        if hasattr(owner, "load_tokenizer"):
            monkeypatch.setattr(owner, "load_tokenizer", lambda cfg: Tokenizer.from_dir(None))
    monkeypatch.setattr("sys.argv", [module.__name__ + ".py", *argv])
    module.main()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train_reward.py on 24 toy pairs, scored on 8 held-out ones at steps 6 and 12 (before
    training every score is 0: accuracy 0, see test_values_are_...)."""
    import train_reward
    tmp = tmp_path_factory.mktemp("rm")
    synthetic.write_jsonl(toy_pairs(range(24)), tmp / "train.jsonl")
    synthetic.write_jsonl(toy_pairs(range(100, 108)), tmp / "test.jsonl")
    mp = pytest.MonkeyPatch()
    try:
        run_stage(mp, ["--data_path", str(tmp / "train.jsonl"), "--eval_data_path", str(tmp / "test.jsonl"),
                       "--out_dir", str(tmp / "run"), "--model_preset", "tiny", "--seq_len", "64",
                       "--batch_size", "8", "--max_steps", "12", "--lr", "3e-3", "--eval_every", "6",
                       "--log_every", "6", "--no-progress", "--no-plot", "--dtype", "fp32",
                       "--peak_tflops", "1"], train_reward)
    finally:
        mp.undo()
    return tmp / "run"


def test_stage_raises_held_out_pairwise_accuracy(trained):
    evals = [m for m in map(json.loads, open(trained / "metrics.jsonl")) if "val/test/rm/accuracy" in m]
    accuracy = [m["val/test/rm/accuracy"] for m in evals]
    assert [m["step"] for m in evals] == [6, 12]
    assert accuracy[-1] == 1.0 and evals[-1]["val/test/rm/margin"] > 0, accuracy


def test_folder_loads_back_as_a_reward_model_and_its_body_as_an_lm(trained):
    folder = trained / "final"
    model = rm.load_reward_model(folder)
    tok = Tokenizer.from_dir(None)
    ids = [torch.tensor(tok.encode(tok.apply_chat_template(p["chosen"]))) for p in toy_pairs([7])]
    values, _ = rm.token_values(model, ids[0][None])
    assert values.shape == (1, len(ids[0])) and not model.training
    body = load_pretrained(folder)            # strict: the head lives in its own file
    assert not hasattr(body, "v_head")
    assert set(load_file(folder / rm.VALUE_HEAD_NAME)) == {"v_head.summary.weight", "v_head.summary.bias"}
    with pytest.raises(Exception, match="not a reward model"):
        rm.load_reward_model(trained / "checkpoints" / "step_000012")


def test_grpo_trains_on_open_ended_prompts_with_a_reward_model(tmp_path, monkeypatch):
    """`--reward reward_model:PATH` on prompts with no gold answer: every rollout's reward is the
    reward model's score, which (its head being the lm_head row of one token) equals that token's
    logit after prompt + completion from a plain forward."""
    import train_grpo
    tok = Tokenizer.from_dir(None)
    judge = logit_head(tiny(), 42)
    rm.save_reward_model(judge, tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    synthetic.write_jsonl([{"conversations": [{"role": "user", "content": f"Tell me about {w}."}]}
                           for w in ("cats", "rain", "tea", "maps")], prompts)
    with pytest.raises(RewardSpecError, match="not a reward model folder"):
        RewardMix.from_spec(f"reward_model:{tmp_path}")
    run_stage(monkeypatch, ["--data_path", str(prompts), "--out_dir", str(tmp_path / "run"),
                            "--model_preset", "tiny", "--reward", f"reward_model:{tmp_path / 'rm'}:0.5",
                            "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "3",
                            "--seq_len", "64", "--max_steps", "2", "--log_every", "1", "--no-progress",
                            "--no-plot", "--dtype", "fp32", "--peak_tflops", "1"], train_grpo)
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all("reward/reward_model" in m for m in metrics if "reward" in m)
    samples = [json.loads(line) for line in open(tmp_path / "run" / "rollouts.jsonl")]
    assert len(samples) == 2 * 2 * 2 and all(s["gold"] is None for s in samples)
    judge.eval()
    for s in samples:
        conv = [{"role": "user", "content": s["prompt"]}, {"role": "assistant", "content": s["completion"]}]
        ids = torch.tensor(tok.encode(tok.apply_chat_template(conv)))
        logit = judge(ids[None]).logits[0, -1, 42].item()
        assert s["reward"] == pytest.approx(0.5 * logit, abs=1e-4)


def test_lora_reward_model_saves_merged_and_scores_the_same(tmp_path):
    from model.lora import apply_lora
    model = tiny().eval()
    apply_lora(model, "all", rank=4, alpha=8)
    head = rm.add_value_head(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "v_head" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(3, 100, (2, 7))
    want, _ = rm.token_values(model, ids)
    loaded = rm.load_reward_model(rm.save_reward_model(model, tmp_path / "rm"))
    got, _ = rm.token_values(loaded, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert rm.value_head(model) is head          # the model keeps its head after saving
