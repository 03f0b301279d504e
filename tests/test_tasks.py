"""The task registry (tasks/__init__.py): asking a task by name, and the RL prompt record (messages,
task, gold) of each data kind that GRPO trains on."""
import pytest

import tasks
from tasks import rl_prompt


def test_every_task_has_the_common_shape():
    for name in tasks.NAMES:
        task = tasks.get(name)
        assert task.NAME == name
        for attr in ("load", "question", "score", "summarize", "convert_file", "main", "is_record",
                     "rl_prompt", "gold_of_reply", "correct", "ANSWER_MARKER"):
            assert hasattr(task, attr), (name, attr)
        assert hasattr(task, "exemplars") == task.FEWSHOT
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        tasks.get("mmlu")


@pytest.mark.parametrize("obj, want", [
    ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "2 + 2 = 4\n#### 4"}]},
     {"task": "gsm8k", "gold": "4", "turns": 3}),
    ({"conversations": [{"role": "user", "content": "x?"},
                        {"role": "assistant", "reasoning_content": "so $\\boxed{3}$", "content": "3"}]},
     {"task": "math", "gold": "3", "turns": 1}),
    ({"question": "q", "answer": "steps\n#### 1,080"}, {"task": "gsm8k", "gold": "1080", "turns": 1}),
    ({"problem": "p", "solution": "thus $\\boxed{\\frac12}$"}, {"task": "math", "gold": "\\frac12", "turns": 1}),
    ({"instruction": "i", "label": 0, "gold": "true", "dataset": "boolq", "choices": ["true", "false"]},
     {"task": "commonsense", "gold": "true", "turns": 1}),
])
def test_prompt_records_of_each_data_kind(obj, want):
    rec = rl_prompt(obj, "f:1")
    assert (rec["task"], rec["gold"], len(rec["messages"])) == (want["task"], want["gold"], want["turns"])
    assert rec["messages"][-1]["role"] == "user"


def test_identity_replies_without_gold_are_skipped_and_junk_is_an_error():
    chat = {"conversations": [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "me"}]}
    assert rl_prompt(chat, "f:1") is None
    with pytest.raises(ValueError, match="f:2: not a prompt record"):
        rl_prompt({"text": "plain"}, "f:2")
