"""eval_model.py as a user runs it: one-shot prompt, interactive chat on stdin, --bench; and its
history trimming and --data parsing as functions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_model
from common.errors import UserError
from dataset.chat import generation_prompt_ids
from evaluation.runner import parse_data_flags
from model.config import MiniMindConfig
from model.io import save_pretrained
from model.model import MiniMindLM
from model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny")), d)
    return d


def run_cli(args: list[str], stdin: str = "", cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    # Run from another folder: the script must not depend on the working directory.
    return subprocess.run([sys.executable, str(REPO / "eval_model.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=180, cwd=cwd or Path("/"))


def test_one_shot_prompt_prints_text_and_speed(ckpt):
    proc = run_cli(["--model", str(ckpt), "--prompt", "Hello, who are you?",
                    "--max_new_tokens", "12", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # the (random) answer text
    assert "tokens/s" in proc.stderr and "12 tokens" in proc.stderr
    # Greedy with the same seed: the one-shot answer is reproducible.
    again = run_cli(["--model", str(ckpt), "--prompt", "Hello, who are you?",
                     "--max_new_tokens", "12", "--device", "cpu"])
    assert again.stdout == proc.stdout


def test_speculative_prompt_answers_as_plain_greedy_and_reports_acceptance(tmp_path, capsys):
    """--draft_model (the model itself: every proposal accepted) and --prompt_lookup give the
    plain greedy answer; stderr adds the acceptance; both flags at once are one error line."""
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    with torch.no_grad():  # weights at std 0.2: the default init answers one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    ckpt = tmp_path / "varied"
    save_pretrained(model, ckpt)
    common = ["--model", str(ckpt), "--prompt", "Hello, who are you?", "--max_new_tokens", "12",
              "--temperature", "0", "--device", "cpu", "--dtype", "fp32"]
    eval_model.main(common)
    plain = capsys.readouterr()
    for extra in (["--draft_model", str(ckpt), "--draft_tokens", "3", "--draft_p_min", "0"],
                  ["--prompt_lookup", "3"]):
        eval_model.main(common + extra)
        out = capsys.readouterr()
        assert out.out == plain.out and len(set(plain.out)) > 5
        assert "speculation:" in out.err and "tokens per target forward" in out.err
    assert "(100.0 %)" in eval_model_err(common + ["--draft_model", str(ckpt), "--draft_p_min",
                                                   "0"], capsys)
    with pytest.raises(UserError, match="pick one"):
        eval_model.main(common + ["--draft_model", str(ckpt), "--prompt_lookup", "2"])


def eval_model_err(argv, capsys) -> str:
    eval_model.main(argv)
    return capsys.readouterr().err


def test_interactive_chat_driven_by_stdin(ckpt):
    proc = run_cli(["--model", str(ckpt), "--max_new_tokens", "6", "--temperature", "0",
                    "--system", "You are helpful."],
                   stdin="hi there\nand again\n/reset\nfresh start\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tokens/s") == 3  # three answers; nothing after /exit
    assert "(conversation reset)" in proc.stdout
    prompts = [int(line.split("prompt ")[1].split()[0]) for line in proc.stderr.splitlines()
               if "tokens/s" in line]
    assert prompts[1] > prompts[0]  # the second turn carries the first exchange
    assert prompts[2] < prompts[1]  # after /reset the history is gone


def test_interactive_chat_ends_on_eof(ckpt):
    proc = run_cli(["--model", str(ckpt), "--max_new_tokens", "3"], stdin="one question\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tokens/s") == 1


def test_bench_from_the_command_line(ckpt, tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"})
                            + "\n" for i in range(3)))
    out = tmp_path / "out"
    proc = run_cli(["--model", str(ckpt), "--bench", "gsm8k", "--data", f"gsm8k={data}",
                    "--limit", "2", "--max_new_tokens", "4", "--out", str(out), "--batch_size",
                    "2", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    for f in ("gsm8k.items.jsonl", "gsm8k.summary.json", "gsm8k.md", "gsm8k.csv"):
        assert (out / f).is_file()
    summary = json.loads((out / "gsm8k.summary.json").read_text())
    assert summary["n"] == 2 and summary["meta"]["temperature"] == 0.0  # greedy by default
    assert summary["meta"]["max_new_tokens"] == 4


@pytest.mark.parametrize("extra,message", [
    ([], "error: gsm8k: no data given; pass --data gsm8k=PATH"),
    (["--data", "gsm8k=/no/such/file.jsonl"],
     "error: gsm8k: data not found at /no/such/file.jsonl (pass --data gsm8k=PATH)"),
    (["--data", "x.jsonl", "--bench", "gsm8k,nope"], "error: unknown benchmark 'nope'; choose from"),
    (["--data", "x.jsonl", "--samples", "4"], "error: --samples 4: needs >= 1, and --temperature > 0"),
])
def test_bench_data_errors_are_one_line_before_the_model_loads(tmp_path, extra, message):
    # The model folder does not exist: the data check must come first (no slow load for a typo).
    bench = [] if "--bench" in extra else ["--bench", "gsm8k"]
    proc = run_cli(["--model", str(tmp_path / "missing"), *bench, *extra])
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr


def test_history_is_trimmed_oldest_first_keeping_the_system_prompt():
    tok = Tokenizer.from_dir()
    msgs = [{"role": "system", "content": "SYS"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 20},
                 {"role": "assistant", "content": f"answer {i} " + "word " * 20}]
    msgs.append({"role": "user", "content": "LAST"})
    full = generation_prompt_ids(tok, msgs, False, 10_000)
    budget = len(full) // 2
    ids = generation_prompt_ids(tok, msgs, False, budget)
    text = tok.decode(ids)
    assert len(ids) <= budget
    assert text.startswith("<|im_start|>system\nSYS") and "LAST" in text
    assert "question 0" not in text and "answer 5" in text


def test_data_flags():
    assert parse_data_flags(["gsm8k=a.jsonl", "ppl=b.txt"], ["gsm8k", "ppl"]) == {
        "gsm8k": "a.jsonl", "ppl": "b.txt"}
    assert parse_data_flags(["x.jsonl"], ["math"]) == {"math": "x.jsonl"}
    args = eval_model.parse_args(["--model", "m"])
    chat, bench = eval_model.sampling(args, False, 0), eval_model.sampling(args, True, 0)
    assert chat.temperature > 0 and bench.temperature == 0.0 and bench.top_p == 1.0



def test_chat_prints_whole_characters_and_no_control_tokens(monkeypatch):
    """The chat CLI's streamed answer for tokens that split 🙂 around <|reserved_356|>
    (tests/scripted_model): every print is whole characters, never a control token's name."""
    from model.generate import SamplingParams
    from tests.scripted_model import SPLIT_TEXT, scripted_model, split_script

    printed = []
    monkeypatch.setattr(eval_model, "print", lambda *a, file=None, **kw: file or printed.append(a[0]),
                        raising=False)
    tok = Tokenizer.from_dir()
    text = eval_model.reply(scripted_model(split_script(tok)), tok, [{"role": "user", "content": "hi"}],
                            SamplingParams(max_new_tokens=32, stop_token_ids=(tok.eos_id,)), think=False)
    assert text == SPLIT_TEXT and "".join(printed) == SPLIT_TEXT and "🙂" in printed
    assert all("\ufffd" not in p and "<|" not in p for p in printed), printed
