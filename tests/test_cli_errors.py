"""The error boundary (common/errors.py): a user's mistake ends an entry point with exit status 2 and
one `error: ...` line on stderr, no traceback; --debug / MINIMIND_DEBUG=1 bring the traceback back;
a bug keeps its traceback. The subprocesses only parse and validate (each fails before training)."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ModelNotFoundError, UserError, one_line, run_cli

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "MINIMIND_DEBUG"}
    environ.update(OMP_NUM_THREADS="1", MINIMIND_DATA_CACHE=str(tmp_path / "cache"), **env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=environ)


def user_error(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a user error (asserting exit 2 and no traceback), without `error: `."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0].removeprefix("error: ")


def test_missing_data_file(tmp_path):
    msg = user_error(run(["train_pretrain.py", "--data_path", "/nonexistent.jsonl"], tmp_path))
    assert "data_path: no such file '/nonexistent.jsonl'" in msg


def test_unknown_yaml_option(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("lrr: 0.1\n")
    msg = user_error(run(["train_full_sft.py", "--config", str(config)], tmp_path))
    assert msg == f"{config}: unknown option 'lrr' (did you mean 'lr'?)"


def test_every_config_problem_is_listed_at_once(tmp_path):
    msg = user_error(run(["train_pretrain.py", "--model_preset", "nope",
                          "--data_path", "/nonexistent.jsonl", "--batch_size", "0"], tmp_path))
    assert msg.startswith("invalid training configuration: ")
    for problem in ("model_preset: unknown preset 'nope'", "data_path: no such file", "batch_size must be >= 1"):
        assert problem in msg, msg


def test_bad_data_line_names_file_and_line(tmp_path):
    data = tmp_path / "pretrain.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": 3}\n{"text": "four"}\n')
    msg = user_error(run(["train_pretrain.py", "--data_path", str(data), "--device", "cpu",
                          "--out_dir", str(tmp_path / "run")], tmp_path))
    assert msg == f"{data}:3: field 'text' must be a string, got int"


def test_converter_cli_reports_the_bad_record(tmp_path):
    src = tmp_path / "alpaca.jsonl"
    src.write_text('{"instruction": "q", "output": "a"}\n{"output": "a"}\n')
    msg = user_error(run(["-m", "dataset.convert.alpaca", str(src), str(tmp_path / "out.jsonl")], tmp_path))
    assert msg.startswith(f"{src}:2: ") and "instruction" in msg
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("script", ["eval_model.py", "scripts/serve_openai_api.py"])
def test_missing_model_folder(tmp_path, script):
    missing = tmp_path / "out" / "missing"
    msg = user_error(run([script, "--model", str(missing)], tmp_path))
    assert msg == f"{missing}: model folder not found"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    args = ["train_pretrain.py", "--data_path", "/nonexistent.jsonl"]
    proc = run(args + ["--debug"], tmp_path) if how == "flag" else run(args, tmp_path, MINIMIND_DEBUG="1")
    assert proc.returncode == 1, proc.stderr[-3000:]     # --debug itself is not an unknown flag (2)
    assert "Traceback" in proc.stderr and "trainer.config.ConfigError" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------- the wrapper in-process
def test_run_cli_user_error_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["prog"])

    def main():
        raise ModelNotFoundError("out/m: model folder not found")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: out/m: model folder not found\n"


def test_run_cli_strips_debug_and_keeps_bugs_loud(monkeypatch):
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["prog", "--debug", "--lr", "1"])
    seen = []

    def user_main():
        seen.append(list(sys.argv))
        raise UserError("bad")
    with pytest.raises(UserError):          # --debug: the exception itself, for its traceback
        run_cli(user_main)
    assert seen == [["prog", "--lr", "1"]]  # the script's parser never sees --debug

    monkeypatch.setattr(sys, "argv", ["prog"])

    def buggy_main():
        raise KeyError("a bug")
    with pytest.raises(KeyError):           # not a UserError: never turned into a one-liner
        run_cli(buggy_main)


def test_one_line_joins_a_problem_list():
    exc = ValueError("invalid training configuration:\n  - lr must be > 0\n  - batch_size must be >= 1")
    assert one_line(exc) == "invalid training configuration: lr must be > 0; batch_size must be >= 1"


def test_user_error_types_keep_their_old_bases():
    from convert.hf import ConversionError
    from dataset.jsonl import DataError, RecordError
    from model.config import MiniMindConfig, UnknownPresetError
    from model.tokenizer import TokenizerError
    from trainer.config import ConfigError
    from trainer.distill import VocabMismatchError

    for cls in (DataError, RecordError, ConversionError, TokenizerError, ConfigError,
                VocabMismatchError, UnknownPresetError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(ModelNotFoundError, FileNotFoundError)
    with pytest.raises(UnknownPresetError, match="'nope'"):
        MiniMindConfig.from_preset("nope")


# ------------------------------------------- more entry points, run in-process as `python script`
def run_main(script: str, args: list[str], monkeypatch, capsys) -> str:
    """Execute `script` as __main__ (its run_cli boundary included) without a new interpreter;
    the one `error:` line it ends with (asserting exit 2 and no traceback)."""
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("[load]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def test_train_tokenizer_missing_data_file(tmp_path, monkeypatch, capsys):
    msg = run_main("scripts/train_tokenizer.py", ["--data", "/nonexistent.jsonl", "--out", str(tmp_path)],
                   monkeypatch, capsys)
    assert msg == "no such file: /nonexistent.jsonl"


def test_convert_model_errors_exit_2(tmp_path, monkeypatch, capsys):
    msg = run_main("scripts/convert_model.py", ["import", "--hf", str(tmp_path / "nope"), "--out",
                                               str(tmp_path / "o")], monkeypatch, capsys)
    assert msg.startswith(f"{tmp_path / 'nope' / 'config.json'}: not found")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    msg = run_main("scripts/convert_model.py", ["import-minimind", "--pth", str(tmp_path / "x.pth"),
                                               "--config", str(bad), "--out", str(tmp_path / "o")],
                   monkeypatch, capsys)
    assert "Expecting property name" in msg


def test_generate_sft_data_contradictory_options(tmp_path, monkeypatch, capsys):
    msg = run_main("scripts/generate_sft_data.py", ["--teacher", str(tmp_path), "--prompts", "p.jsonl",
                                                   "--out", str(tmp_path / "o.jsonl"), "--num_samples", "2",
                                                   "--temperature", "0"], monkeypatch, capsys)
    assert msg.startswith("--num_samples > 1 with greedy decoding")


def test_adapter_of_another_base_is_refused(tmp_path, monkeypatch, capsys):
    import torch

    from model.config import MiniMindConfig
    from model.io import save_pretrained
    from model.lora import apply_lora, save_adapter
    from model.model import MiniMindLM

    other = MiniMindLM(MiniMindConfig.from_preset("tiny", qk_norm=True))
    apply_lora(other, "all_attention", rank=2, alpha=4)
    save_adapter(other, tmp_path / "adapter")
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny")), tmp_path / "base")
    torch.set_num_threads(1)
    msg = run_main("eval_model.py", ["--model", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter"),
                                     "--prompt", "hi", "--device", "cpu"], monkeypatch, capsys)
    assert msg.startswith(f"{tmp_path / 'adapter' / 'adapter_config.json'}: adapter belongs to a "
                          "different base model") and "qk_norm: adapter True vs model False" in msg
