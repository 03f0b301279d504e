"""examples/commonsense_benchmark/*.yaml end to end on tiny stand-ins of their model families.

Each recipe trains (a couple of steps) with every option as written except sizes and paths: the
real checkpoint is replaced by scripts/make_moe_standins.py's transformers-saved stand-in,
imported through scripts/convert_model.py; the data by a few records of each of the eight sets
from ../shared/data, converted by the recipe's own converter. Then the recipe's Evaluate command
scores every set, in the recipe's mode (torch experts, or kt-kernel's for the `_kt` twins, which
train and evaluate in one subprocess: a native crash fails those tests, not the run). The twins
skip with kt_status's reason where the CPU variant has no training kernels.
"""
from __future__ import annotations

import gzip
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import eval_model
import train_full_sft
from offload.experts import kt_status
from tests.conftest import shared_path
from tests.test_examples import header_command as header_text
from trainer.config import parse_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "examples" / "commonsense_benchmark").glob("*.yaml"))
SETS = ("ARC-Challenge", "ARC-Easy", "boolq", "hellaswag", "openbookqa", "piqa", "social_i_qa",
        "winogrande")
KT_OK, KT_WHY = kt_status()
TINY = ["--device", "cpu", "--no-progress", "--no-plot", "--peak_tflops", "1", "--max_steps", "2",
        "--batch_size", "2", "--eval_batches", "1", "--eval_every", "2",
        "--save_every", "2", "--warmup_steps", "0", "--log_every", "1", "--kt_num_threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def header_command(path: Path, label: str) -> list[str]:
    """The command after `# <label>:` in the recipe's header, as argv."""
    return shlex.split(header_text(path, label), comments=True)


def _records(folder: Path, split: str) -> list[dict] | None:
    for name in (f"{split}.json", f"{split}_reconstructed.json.gz"):
        if (folder / name).is_file():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(folder / name, "rt", encoding="utf-8") as f:
                return json.load(f)
    return None


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny LLM-Adapters tree of all eight sets (8 train + 2 test records each) converted by the
    recipes' Data command. ../shared/data has train.json for four sets; the other four train on
    test records 2-9, which their two test records (0-1) never meet."""
    src = shared_path("commonsense_llm_adapters")
    root = tmp_path_factory.mktemp("commonsense")
    for name in SETS:
        test = _records(src / name, "test")
        train = _records(src / name, "train") or test[2:10]
        (root / "src" / name).mkdir(parents=True)
        (root / "src" / name / "train.json").write_text(json.dumps(train[:8]))
        (root / "src" / name / "test.json").write_text(json.dumps(test[:2]))
    cmd = header_command(RECIPES[0], "Data (once)")
    assert cmd[:4] == ["python", "-m", "tasks.commonsense", "convert"], cmd
    swap = {"--src": str(root / "src"), "--out": str(root / "data")}
    from tasks.commonsense import main as convert
    convert([swap.get(prev, a) for prev, a in zip(cmd[2:], cmd[3:])])
    return root


_STANDINS: dict[str, Path | str] = {}   # family → our folder, or why it cannot be imported


def import_standin(family: str, root: Path) -> Path | str:
    """The family's stand-in, saved by transformers and imported by scripts/convert_model.py
    (once per module); a string says why the importer cannot read it (yet)."""
    if family not in _STANDINS:
        from convert.cli import main as convert_model
        from convert.standins import make_standin
        hf = make_standin(family, root / "hf" / family)
        try:
            convert_model(["import", "--hf", str(hf), "--out", str(root / "ours" / family)])
            _STANDINS[family] = root / "ours" / family
        except SystemExit as e:  # the CLI's one-line error
            if "unsupported model_type" not in str(e):
                raise
            _STANDINS[family] = f"scripts/convert_model.py import cannot read {family} yet: {e}"
    return _STANDINS[family]


def family(path: Path) -> str:
    return path.stem.split("_")[0]


def train_args(path: Path, work: Path, base: Path) -> list[str]:
    """The recipe as written, with the stand-in, the tiny data and a couple of steps."""
    kt = path.stem.endswith("_kt")
    return ["--config", str(path), *TINY, "--init_from", str(base), "--dataset_dir",
            str(work / "data"), "--out_dir", str(work / path.stem), "--dtype", "bf16" if kt else "fp32"]


def eval_args(path: Path, work: Path, base: Path) -> list[str]:
    """The recipe's Evaluate command on the stand-in, its adapter and the tiny test sets."""
    cmd = header_command(path, "Evaluate")
    assert cmd[:2] == ["python", "eval_model.py"], cmd
    out = work / path.stem
    swap = {"--model": str(base), "--lora": str(out / "final"), "--out": str(out / "eval"),
            "--data": f"commonsense={work / 'src'}"}
    argv = [swap.get(prev, a) for prev, a in zip(cmd[1:], cmd[2:])]
    return [*argv, "--limit", "1", "--max_new_tokens", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def kt_runs(work) -> dict[str, str]:
    """Every `_kt` recipe whose family imports, trained and evaluated (experts in kt-kernel both
    times) in ONE subprocess: a kt-kernel crash fails these tests, not the run, and one process
    saves an interpreter start per recipe. {stem: output}."""
    todo = [p for p in RECIPES if p.stem.endswith("_kt")
            and isinstance(import_standin(family(p), work), Path)]
    if not KT_OK or not todo:
        return {}
    jobs = []
    for p in todo:
        base = import_standin(family(p), work)
        jobs += [("train_full_sft", train_args(p, work, base)), ("eval_model", eval_args(p, work, base))]
    code = ("import importlib, json, sys\n"
            "for module, argv in json.loads(sys.argv[1]):\n"
            "    sys.argv = [module + '.py', *argv]\n"
            "    importlib.import_module(module).main()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIMIND_DATA_CACHE": str(work / "cache"),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {p.stem: proc.stdout for p in todo}


def test_every_family_has_a_recipe_and_a_kt_twin():
    names = {p.name for p in RECIPES}
    assert names == {f"{f}_lora_sft{kt}.yaml" for f in ("deepseek2", "deepseek3", "qwen3moe")
                     for kt in ("", "_kt")}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_validates_and_scores_every_set(path, work, monkeypatch, request):
    kt = path.stem.endswith("_kt")
    if kt and not KT_OK:
        pytest.skip(f"kt backend unavailable: {KT_WHY}")
    cfg = parse_config(train_full_sft.SFTConfig, ["--config", str(path)], validate=False)
    assert cfg.use_lora and cfg.expert_backend() == ("kt" if kt else "torch")
    assert cfg.data_path == [f"{s}_train_sft" for s in SETS]        # the eight sets merged
    assert cfg.eval_data_path == [f"{s}_test_sft" for s in SETS]    # validated one by one
    assert "set init_from below to that folder" in path.read_text()  # where the real model goes
    evaluate = header_command(path, "Evaluate")                     # scored in the recipe's mode
    assert ("kt" if kt else "torch") == (evaluate[evaluate.index("--moe_backend") + 1]
                                         if "--moe_backend" in evaluate else "torch")

    base = import_standin(family(path), work)
    if isinstance(base, str):
        pytest.skip(base)
    out = work / path.stem
    if kt:
        assert path.stem in request.getfixturevalue("kt_runs")
    else:
        monkeypatch.setattr(sys, "argv", ["train_full_sft.py", *train_args(path, work, base)])
        train_full_sft.main()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in rows if "val_loss" in r)
    assert {f"val/{s}_test_sft/loss" for s in SETS} <= val.keys()
    ckpt = out / "checkpoints" / "step_000002"                       # adapters, not the base
    assert (ckpt / "base.json").is_file() and not (ckpt / "model.safetensors").exists()
    if kt:   # the kernel's expert adapters are checkpointed with the rest
        from safetensors import safe_open
        with safe_open(str(ckpt / "trainable.safetensors"), "pt") as f:
            held = set(f.keys()) | set(json.loads((ckpt / "base.json").read_text())
                                       ["trainable_elsewhere"])
        assert any(".experts." in k and ".lora_" in k for k in held)

    if not kt:
        eval_model.main([*eval_args(path, work, base), "--dtype", "fp32"])
    summary = json.loads((out / "eval" / "commonsense.summary.json").read_text())
    assert set(summary["per_category"]) == set(SETS)                # accuracy per set
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in summary["per_category"].values())
