"""The SFT/DPO loss mask is exactly the assistant replies (checked by decoding the supervised tokens)."""

from __future__ import annotations

import json

import pytest

from dataset.chat import IGNORE_INDEX, assistant_spans, encode_conversation, messages_to_ids_and_labels



@pytest.fixture(scope="module")
def tok(upstream_tokenizer):
    return upstream_tokenizer


TOOLS = [{"name": "get_weather", "description": "Weather by city", "parameters": {"type": "object"}}]
CONVERSATION = [
    {"role": "system", "content": "You are terse.", "tools": json.dumps(TOOLS)},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I need the tool twice.",
        "tool_calls": json.dumps(
            [
                {"name": "get_weather", "arguments": {"city": "Paris"}},
                {"name": "get_weather", "arguments": {"city": "Rome"}},
            ]
        ),
    },
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "tool", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "Paris 20°C, Rome 25°C."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "<think>\nPolite.\n</think>\n\nYou are welcome."},
]
EXPECTED_REPLIES = [
    "<think>\nI need the tool twice.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
    "<think>\n\n</think>\n\nParis 20°C, Rome 25°C.<|im_end|>",
    "<think>\nPolite.\n</think>\n\nYou are welcome.<|im_end|>",
]


def supervised_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded maximal runs of supervised tokens."""
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i  # labels are aligned with input_ids; the model shifts
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def reference_replies(text: str) -> list[str]:
    """Independent, string-level reference: what follows each assistant header up to its end."""
    header, end = "<|im_start|>assistant\n", "<|im_end|>"
    return [part[: part.index(end) + len(end)] for part in text.split(header)[1:]]


def test_mask_is_exactly_the_assistant_replies(tok):
    ids, labels = messages_to_ids_and_labels(tok, CONVERSATION)
    runs = supervised_runs(tok, ids, labels)
    assert runs == EXPECTED_REPLIES
    assert runs == reference_replies(tok.decode(ids))
    supervised = "".join(runs)
    for not_trained in ("You are terse.", "Weather in Paris", '{"temp": 20}', "Thanks!", "# Tools", "<|im_start|>"):
        assert not_trained not in supervised
    # Everything else is masked: the unsupervised tokens are exactly the rest of the text.
    unsupervised = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert len(unsupervised) + len(supervised) == len(tok.decode(ids))


def test_last_turn_only_for_dpo(tok):
    ids, labels = messages_to_ids_and_labels(tok, CONVERSATION, last_turn_only=True)
    assert supervised_runs(tok, ids, labels) == EXPECTED_REPLIES[-1:]


def test_tools_argument_and_multiple_systems(tok):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "late system"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    ids, labels = messages_to_ids_and_labels(tok, messages, tools=TOOLS)
    assert "# Tools" in tok.decode(ids)
    empty_think = "<think>\n\n</think>\n\n"
    assert supervised_runs(tok, ids, labels) == [f"{empty_think}b<|im_end|>", f"{empty_think}d<|im_end|>"]


def test_truncation_keeps_a_prefix_and_cuts_the_mask(tok):
    full = encode_conversation(tok, CONVERSATION)
    second = assistant_spans(full.ids, tok)[1]
    cut = second[0] + 3  # three tokens into the second reply
    enc = encode_conversation(tok, CONVERSATION, max_length=cut)
    assert enc.truncated and len(enc.ids) == cut
    runs = supervised_runs(tok, enc.ids.tolist(), enc.labels.tolist())
    assert runs[0] == EXPECTED_REPLIES[0]
    assert EXPECTED_REPLIES[1].startswith(runs[1]) and len(runs[1]) < len(EXPECTED_REPLIES[1])
    before_first = encode_conversation(tok, CONVERSATION, max_length=assistant_spans(full.ids, tok)[0][0])
    assert not before_first.mask.any()


def test_reserved_strings_and_missing_assistant_are_rejected(tok):
    with pytest.raises(ValueError, match="reserved control string"):
        forged = [{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": "x"}]
        messages_to_ids_and_labels(tok, forged)
    with pytest.raises(ValueError, match="no assistant turn"):
        messages_to_ids_and_labels(tok, [{"role": "user", "content": "x"}])


def test_template_that_drops_a_turn_is_caught(tok):
    class DropsTurns:
        """A tokenizer whose template loses the first assistant turn."""

        def __getattr__(self, name):
            return getattr(tok, name)

        def apply_chat_template(self, messages, tools=None, **kw):
            return tok.apply_chat_template([m for m in messages if m["content"] != "b"], tools=tools, **kw)

    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ValueError, match="rendered 1 assistant turns for 2"):
        messages_to_ids_and_labels(DropsTurns(), messages)


TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Sum 2+3?"},
    {"role": "assistant", "content": "It is 5."},
]
# The rendered 2-turn conversation cut by hand into prompt pieces (P), replies (R) and the tail (T).
PIECES = [
    ("P", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
          "<|im_start|>assistant\n"),
    ("R", "<think>\n\n</think>\n\nHello.<|im_end|>"),
    ("P", "\n<|im_start|>user\nSum 2+3?<|im_end|>\n<|im_start|>assistant\n"),
    ("R", "<think>\n\n</think>\n\nIt is 5.<|im_end|>"),
    ("T", "\n"),
]


@pytest.mark.parametrize("train_on_prompt, mask_history, supervised", [
    (False, False, "-R-R-"),     # the replies
    (True, False, "PRPRT"),      # LLaMA-Factory train_on_prompt: everything
    (False, True, "---R-"),      # mask_history: the last reply only
    (True, True, "P-PRT"),       # both: only the history reply is left out (LLaMA-Factory's rule)
])
def test_train_on_prompt_and_mask_history_match_hand_built_masks(tok, train_on_prompt, mask_history,
                                                                  supervised):
    ids, mask = [], []
    for (_, text), flag in zip(PIECES, supervised):
        piece = tok.encode(text)
        ids += piece
        mask += [flag != "-"] * len(piece)
    enc = encode_conversation(tok, TWO_TURNS, train_on_prompt=train_on_prompt, mask_history=mask_history)
    assert enc.ids.tolist() == ids          # the pieces tokenize exactly like the whole
    assert enc.mask.tolist() == mask
    assert tok.decode(enc.ids.tolist()) == "".join(text for _, text in PIECES)


def test_mask_history_truncates_the_oldest_exchange_first(tok):
    last_only = [TWO_TURNS[0], *TWO_TURNS[3:]]
    short = encode_conversation(tok, last_only)
    full = encode_conversation(tok, TWO_TURNS)
    budget = len(short.ids) + 2
    assert len(full.ids) > budget
    kept = encode_conversation(tok, TWO_TURNS, max_length=budget, mask_history=True)
    assert kept.truncated and kept.ids.tolist() == short.ids.tolist()   # system + last exchange, whole
    assert supervised_runs(tok, kept.ids.tolist(), kept.labels.tolist()) == [PIECES[3][1]]
    # without mask_history the right cut keeps the history and loses the last reply
    plain = encode_conversation(tok, TWO_TURNS, max_length=budget)
    assert supervised_runs(tok, plain.ids.tolist(), plain.labels.tolist()) == [PIECES[1][1]]
    # when even the last exchange is too long, it is cut from the right like any other sample
    tiny = encode_conversation(tok, TWO_TURNS, max_length=len(short.ids) - 3, mask_history=True)
    assert tiny.ids.tolist() == short.ids.tolist()[:-3]


def test_tool_results_are_never_supervised():
    """A synthetic tool conversation: the calls and the answer are trained, the tool's output
    (which the model reads, never writes) and the tool list are not (the shipped tokenizer)."""
    from dataset.synthetic import tool_conversations
    from model.tokenizer import Tokenizer
    tok = Tokenizer.from_dir()
    rec = next(r for r in tool_conversations(50, seed=1) if len(r["conversations"]) == 6)  # chained
    ids, labels = messages_to_ids_and_labels(tok, rec["conversations"], tools=rec["tools"])
    supervised = "".join(supervised_runs(tok, ids, labels))
    results = [m["content"] for m in rec["conversations"] if m["role"] == "tool"]
    assert supervised.count("<tool_call>") == 2 and "<tool_response>" not in supervised
    assert '"name": "calculator"' in supervised and "convert_units" in supervised
    # The product is supervised once (the second call's value), never as the first tool response.
    text = tok.decode(ids)
    assert text.count(f"<tool_response>\n{results[0]}\n</tool_response>") == 1
    assert supervised.count(results[1]) == 2  # the conversion's result: only in the answer turn
    assert supervised.endswith(f"#### {results[1]}<|im_end|>")
    assert supervised_runs(tok, ids, labels) == reference_replies(text)
