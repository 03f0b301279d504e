"""trainer/rewards.py: each reward on hand-made completions, DAPO's overlong penalty at its
breakpoints, and the `--reward` spec (weights, errors)."""
import pytest

from trainer import rewards
from trainer.rewards import RewardMix, RewardSpecError, parse_reward_spec

GSM = {"task": "gsm8k", "gold": "72"}
MATH = {"task": "math", "gold": "\\frac{1}{2}"}
BOOLQ = {"task": "commonsense", "gold": "true", "dataset": "boolq", "num_choices": 2}


@pytest.mark.parametrize("text, sample, want", [
    ("46 + 26 = 72.\n#### 72", GSM, 1.0),
    ("#### 71", GSM, 0.0),
    ("no number at all", GSM, 0.0),
    ("<think>\nmaybe 5\n</think>\n\n#### 72", GSM, 1.0),
    ("<think>\n#### 72\n</think>\n\n#### 5", GSM, 0.0),   # only the text after the think block counts
    ("So it is $\\boxed{0.5}$.", MATH, 1.0),               # the MATH scorer's equivalence
    ("So it is $\\boxed{2}$.", MATH, 0.0),
    ("the correct answer is true", BOOLQ, 1.0),
    ("the correct answer is false", BOOLQ, 0.0),
])
def test_correctness_uses_the_evaluation_scorers(text, sample, want):
    assert rewards.correctness_reward(text, sample) == want


@pytest.mark.parametrize("text, thinking, want", [
    ("#### 72", False, 1.0),
    ("the answer is 72", False, 0.5),                 # no marker
    ("<think> hmm #### 72", False, 0.5),              # a think block left open
    ("reasoning\n</think>\n\n#### 72", True, 1.0),    # the prompt opened <think>
    ("reasoning without closing #### 72", True, 0.5),
    ("<think>x</think>", False, 0.5),
])
def test_format_reward_checks_marker_and_think_block(text, thinking, want):
    assert rewards.format_reward(text, {**GSM, "thinking": thinking}) == want


@pytest.mark.parametrize("tokens, truncated, want", [
    (10, False, 0.0), (75, False, 0.0),     # L_max = 100, L_cache = 25: free up to 75
    (80, False, -0.2), (100, False, -1.0),  # (75 - |y|) / 25
    (100, True, -1.0),                      # cut off by the budget
])
def test_length_penalty_is_dapos_soft_overlong_punishment(tokens, truncated, want):
    sample = {**GSM, "completion_tokens": tokens, "max_new_tokens": 100, "truncated": truncated}
    assert rewards.length_penalty("x", sample) == pytest.approx(want)


def test_mix_weights_the_named_rewards():
    mix = RewardMix.from_spec("correctness:1.0, format:0.1,length")
    sample = {**GSM, "completion_tokens": 80, "max_new_tokens": 100, "truncated": False}
    total, parts = mix.score("the answer is 72", sample)
    assert parts == {"correctness": 1.0, "format": 0.5, "length": pytest.approx(-0.2)}
    assert total == pytest.approx(1.0 + 0.05 - 0.2)


@pytest.mark.parametrize("spec, message", [
    ("correctnes:1", "unknown reward 'correctnes'"),
    ("format:abc", "not a number"),
    ("format,format:2", "listed twice"),
    (" , ", "no reward named"),
])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        parse_reward_spec(spec)
