"""The Streamlit demo, driven headless by Streamlit's own AppTest (no browser, no server)."""

from pathlib import Path

import pytest
import torch

from model.config import MiniMindConfig
from model.generate import SamplingParams, generate
from model.io import save_pretrained
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from serving.chat import parse_assistant_output

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest

APP = str(Path(__file__).resolve().parents[1] / "scripts" / "web_demo.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    with torch.no_grad():  # the default init is so flat that every reply is blank lines
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("web") / "tiny"
    save_pretrained(model.eval(), folder)
    return folder, model.eval()


def start(folder, monkeypatch) -> "AppTest":
    monkeypatch.setenv("MINIMIND_WEB_MODEL", str(folder))
    monkeypatch.setenv("MINIMIND_WEB_DTYPE", "fp32")  # the replies are compared with an fp32 model
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def test_chat_round_trip_streams_a_reply(checkpoint, monkeypatch):
    folder, model = checkpoint
    at = start(folder, monkeypatch)
    assert at.sidebar.text_input(key="model_dir").value == str(folder)
    at.sidebar.slider(key="temperature").set_value(0.0)
    at.sidebar.slider(key="max_new_tokens").set_value(32)
    at.chat_input[0].set_value("What is 2 + 3?").run()
    assert not at.exception, at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    reply = at.chat_message[1].markdown[-1].value

    tok = Tokenizer.from_dir()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                             add_generation_prompt=True))
    gen = generate(model, tok, [ids], SamplingParams(max_new_tokens=32,
                                                     stop_token_ids=(tok.eos_id, tok.pad_id)))[0]
    expected = parse_assistant_output(gen.text).content
    assert expected and reply == expected

    # A second turn keeps the history on the page.
    at.chat_input[0].set_value("And 3 + 4?").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    assert at.chat_message[0].markdown[0].value == "What is 2 + 3?"


def test_thinking_toggle_shows_reasoning_and_clear_resets(checkpoint, monkeypatch):
    folder, _ = checkpoint
    at = start(folder, monkeypatch)
    at.sidebar.toggle(key="thinking").set_value(True)
    at.sidebar.slider(key="max_new_tokens").set_value(16)
    at.chat_input[0].set_value("Think about it").run()
    assert not at.exception, at.exception
    # A random model never closes <think>: its whole reply is reasoning, shown in the expander.
    assert at.chat_message[1].expander[0].label == "Reasoning"
    assert at.chat_message[1].expander[0].markdown[0].value.strip()
    at.sidebar.button(key="clear").click().run()
    assert len(at.chat_message) == 0


def test_output_is_shown_never_run(checkpoint, monkeypatch, tmp_path):
    folder, _ = checkpoint
    marker = tmp_path / "pwned"
    at = start(folder, monkeypatch)
    at.sidebar.radio(key="render").set_value("Plain text")
    at.session_state["history"] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": f"__import__('os').system('touch {marker}') <b>x</b>"}]
    at.run()
    assert at.chat_message[1].code[0].value.startswith("__import__")  # verbatim, as text
    assert not marker.exists()


def test_bad_checkpoint_path_is_an_error_message(tmp_path, monkeypatch):
    at = start(tmp_path / "missing", monkeypatch)
    assert at.error and "Could not load the model" in at.error[0].value


def test_reply_shows_whole_characters_and_no_control_tokens(monkeypatch):
    """The streamed reply of a model whose tokens split 🙂 around <|reserved_356|> (tests/scripted_model)."""
    import inference
    from tests.scripted_model import SPLIT_TEXT, scripted_model, split_script

    tok = Tokenizer.from_dir()
    scripted = scripted_model(split_script(tok))
    monkeypatch.setattr(inference, "load_for_inference", lambda *args, **kw: (scripted, tok))
    at = start("scripted-model", monkeypatch)     # a fresh name: st.cache_resource misses
    at.sidebar.slider(key="temperature").set_value(0.0)
    at.chat_input[0].set_value("hi").run()
    assert not at.exception, at.exception
    assert at.chat_message[1].markdown[-1].value == SPLIT_TEXT
