"""Running an RL stage script (train_grpo.py, train_ppo.py) in-process on a tiny fresh model for
the tests: 16 addition prompts, the shipped tokenizer, and a `space` reward (the answer starts
with a space; 14 % of the shipped tokenizer's tokens do, so an untrained model earns it now and
then and a working update raises it)."""
import json

from trainer import rewards, stage


def space_first_reward(completion, sample):
    return float(completion.startswith(" "))


def run_rl_stage(module, tmp_path, monkeypatch, out, *argv):
    """`module.main()` with the common flags plus `argv`; returns the run's metrics records."""
    from model.tokenizer import Tokenizer
    monkeypatch.setitem(rewards.REWARDS, "space", space_first_reward)
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.from_dir(None)
    monkeypatch.setattr(stage, "load_tokenizer", lambda cfg: tok)   # grpo.rl_setup reads it there
    common = ["--data_path", str(data), "--out_dir", str(out), "--model_preset", "tiny",
              "--max_new_tokens", "3", "--seq_len", "64", "--reward", "space,correctness:0",
              "--log_every", "1", "--no-progress", "--no-plot", "--dtype", "fp32", "--seed", "3",
              "--peak_tflops", "1"]
    monkeypatch.setattr("sys.argv", [module.__name__ + ".py", *common, *argv])
    module.main()
    return [json.loads(line) for line in open(out / "metrics.jsonl")]
