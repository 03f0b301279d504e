"""What the ecosystem checks (scripts/check_*.py) share: the trained model they run on, and how
they say that a tool they need is missing.

Scope: a check compares our numbers with another tool's (lm-evaluation-harness, llama.cpp,
transformers, PEFT, the openai client) on the same model. On random weights every token costs
about ln V: a doubled space or a shifted token moves every choice alike, so the picked answers
agree anyway, and greedy tokens are near-ties. The checks therefore run on a trained model by
default: the quickstart's SFT model when it exists, else a small one trained here once (`tiny`
preset, pretraining then SFT on the project's generated arithmetic problems, through the same
train_*.py commands a user types; 9 minutes on the shared two-core machine under a load of ~7)
and kept in out/checks/trained for the next check.

A missing tool is not a pass: `skip` prints what was not checked and why, and exits with 77
(the automake/ctest convention for a skipped test), distinct from 0 (passed), 1 (failed) and
2 (a user error).
"""
from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_MODEL = REPO / "out" / "quickstart" / "sft" / "final"
TRAINED_DIR = REPO / "out" / "checks" / "trained"
EXIT_SKIPPED = 77
# The small model's recipe: small steps (tiny preset, 16 x 128 tokens), enough of them for the
# loss to fall from ln 6400 = 8.8 to 2.3 (pretraining) and 1.5 (SFT) (measured, seed 0).
RECIPE = dict(preset="tiny", n_pretrain=4000, n_sft=3000, pretrain_steps=150, sft_steps=60,
              batch_size=16, seq_len=128)


def skip(tool: str, install: str, unchecked: str) -> None:
    """Say that `tool` is missing, what is therefore NOT checked, and exit 77 (skipped)."""
    print(f"SKIPPED: {tool} is not installed; not checked: {unchecked}.\n"
          f"  install: {install}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_SKIPPED)


def _run(title: str, *args: str) -> None:
    print(f"[check] {title}: {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def train_small_model(out: Path = TRAINED_DIR, seed: int = 0) -> Path:
    """Train RECIPE's model into `out` (data, pretraining, SFT) and return its model folder,
    self-contained with the tokenizer files. The shipped default tokenizer is used."""
    r = RECIPE
    data = out / "data"
    _run("generate data", "-m", "dataset.synthetic", "--out", str(data), "--seed", str(seed),
         "--n_pretrain", str(r["n_pretrain"]), "--n_sft", str(r["n_sft"]), "--n_dpo", "10",
         "--n_test", "20", "--problems", "one_step")
    common = ["--batch_size", str(r["batch_size"]), "--seq_len", str(r["seq_len"]), "--dtype", "fp32",
              "--seed", str(seed), "--log_every", "25", "--no-progress"]
    _run("pretrain", "train_pretrain.py", "--model_preset", r["preset"], "--data_path",
         str(data / "pretrain.jsonl"), "--max_steps", str(r["pretrain_steps"]), "--lr", "3e-3",
         "--warmup_steps", "5", "--out_dir", str(out / "pretrain"), *common)
    _run("SFT", "train_full_sft.py", "--init_from", str(out / "pretrain" / "final"), "--packing",
         "--data_path", str(data / "sft.jsonl"), "--max_steps", str(r["sft_steps"]), "--lr", "2e-3",
         "--warmup_steps", "2", "--out_dir", str(out / "sft"), *common)
    final = out / "sft" / "final"
    from model.tokenizer import DEFAULT_DIR
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(DEFAULT_DIR / name, final / name)
    return final


def trained_model(given: str | None) -> tuple[Path, str]:
    """(model folder, how it was chosen) for a check: `given` if set, else the quickstart's SFT
    model, else the small model of `train_small_model` (trained now if not there yet)."""
    if given:
        return Path(given), "given with --model"
    if (QUICKSTART_MODEL / "model.safetensors").is_file():
        return QUICKSTART_MODEL, "the quickstart's SFT model"
    final = TRAINED_DIR / "sft" / "final"
    how = (f"a tiny model trained by this check ({RECIPE['pretrain_steps']} pretraining + "
           f"{RECIPE['sft_steps']} SFT steps on generated arithmetic; kept in {TRAINED_DIR})")
    if not (final / "tokenizer_config.json").is_file():   # copied last: the run finished
        print(f"[check] no quickstart model at {QUICKSTART_MODEL}: training a small one "
              f"into {TRAINED_DIR} (a few minutes)", flush=True)
        if TRAINED_DIR.exists():
            shutil.rmtree(TRAINED_DIR)
        train_small_model()
    return final, how


@contextlib.contextmanager
def served(model, tokenizer, name: str = "forge") -> Iterator[tuple[str, object]]:
    """Our OpenAI-compatible server for `model` on a free local port, in this process:
    yields (base URL without /v1, the engine); stopped on exit."""
    import uvicorn

    from serving.engine import Engine
    from serving.openai_api import create_app

    engine = Engine(model, tokenizer).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()
