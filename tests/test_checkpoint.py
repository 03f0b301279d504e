"""Checkpoint folders: tied weights, compatibility with model.io, checksums, fallback, pruning."""
import json
import subprocess
import sys

import pytest
import torch

from model.config import MiniMindConfig
from model.io import load_pretrained
from model.model import MiniMindLM
from trainer import checkpoint as ck


def tiny() -> MiniMindLM:
    return MiniMindLM(MiniMindConfig.from_preset("tiny"))


def save(tmp_path, step, model, val_loss=None, keep_last=10):
    return ck.save_checkpoint(tmp_path, step, model, {"step": step}, keep_last, val_loss)


def test_roundtrip_tied_and_loadable_by_model_io(tmp_path):
    model = tiny()
    path = save(tmp_path, 5, model)
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys()          # stored once
    other = tiny()
    state = ck.load_checkpoint(path, other)
    assert state == {"step": 5}
    assert other.lm_head.weight is other.model.embed_tokens.weight
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    evaluated = load_pretrained(path)                    # a checkpoint is also a model folder
    assert torch.equal(evaluated.lm_head.weight, model.lm_head.weight)


def test_corrupt_file_refused_and_resume_falls_back(tmp_path):
    model = tiny()
    good = save(tmp_path, 1, model)
    bad = save(tmp_path, 2, model)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        ck.verify_checkpoint(bad)
    with pytest.raises(ck.CheckpointError, match="checksum"):
        ck.resolve_resume(str(bad), tmp_path)            # an explicit path never falls back
    said = []
    assert ck.resolve_resume("auto", tmp_path, log=said.append) == good
    assert any("skipping step_000002" in s for s in said) and any("step_000001" in s for s in said)


def test_incomplete_checkpoint_skipped(tmp_path):
    model = tiny()
    good = save(tmp_path, 1, model)
    partial = save(tmp_path, 2, model)
    (partial / ck.MARKER).unlink()
    assert ck.find_latest_checkpoint(tmp_path, log=lambda s: None) == good
    assert ck.resolve_resume("auto", tmp_path / "empty", log=lambda s: None) is None


def test_pruning_keeps_last_and_best_and_pointers(tmp_path):
    model = tiny()
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.2)]:
        save(tmp_path, step, model, val_loss=val, keep_last=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_000002", "step_000004", "step_000005"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000005"
    best, loss = ck.read_best(tmp_path)
    assert best.name == "step_000002" and loss == 1.0


@pytest.mark.parametrize("victim", ["trainer_state.safetensors", "model.safetensors"])
def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, victim):
    """The writer dies half-way through `victim` of step 2 (test hook)."""
    code = (
        "import sys; from model.config import MiniMindConfig; from model.model import MiniMindLM\n"
        "from trainer.checkpoint import save_checkpoint\n"
        "m = MiniMindLM(MiniMindConfig.from_preset('tiny'))\n"
        f"save_checkpoint({str(tmp_path)!r}, 1, m, {{'step': 1}}, 3)\n"
        f"import os; os.environ['MINIMIND_CKPT_FAULT'] = 'exit:{victim}'\n"
        f"save_checkpoint({str(tmp_path)!r}, 2, m, {{'step': 2}}, 3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    step2 = tmp_path / "checkpoints" / "step_000002"
    assert not (step2 / ck.MARKER).exists() and not (step2 / victim).exists()
    said = []
    found = ck.resolve_resume("auto", tmp_path, log=said.append)
    assert found.name == "step_000001" and "incomplete" in said[0]
    assert ck.load_checkpoint(found, tiny()) == {"step": 1}
    assert json.loads((found / ck.MARKER).read_text())["step"] == 1


def test_checkpoint_written_by_the_old_code_resumes_and_loads(tmp_path):
    """The pre-merge checkpoint writer (tied head stored once, "tied" metadata, sorted config)."""
    import hashlib

    from test_io import old_checkpoint_save
    model = tiny()
    ckpt = tmp_path / "checkpoints" / "step_000007"
    old_checkpoint_save(model, ckpt)
    torch.save({"step": 7}, ckpt / "trainer_state.pt")
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
             for p in ckpt.iterdir()}
    (ckpt / ck.MARKER).write_text(json.dumps({"step": 7, "files": files}))
    assert ck.resolve_resume("auto", tmp_path, log=lambda s: None) == ckpt
    other = tiny()
    assert ck.load_checkpoint(ckpt, other) == {"step": 7}
    assert other.lm_head.weight is other.model.embed_tokens.weight
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)
    assert torch.equal(load_pretrained(ckpt).lm_head.weight, model.lm_head.weight)


def test_checkpoint_errors_are_one_line_user_errors(tmp_path):
    from common.errors import UserError
    with pytest.raises(UserError, match="incomplete checkpoint"):
        ck.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    assert issubclass(ck.CheckpointError, RuntimeError)   # old callers' except clauses still hold


# ---------------------------------------------------------------------- LoRA: no base weights
def independent_config_digest(base) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(json.loads((base / "config.json").read_text()),
                                     sort_keys=True).encode()).hexdigest()


def independent_weights_digest(base) -> str:
    """The content fingerprint's formula, computed through the safetensors library's reader."""
    import hashlib

    from safetensors import safe_open
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    digests = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                t = fh.get_tensor(key)
                h = hashlib.sha256(json.dumps([names[t.dtype], list(t.shape)]).encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
                digests[key] = h.hexdigest()
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def lora_on(base_dir, seed=1) -> MiniMindLM:
    from model.lora import apply_lora
    model = load_pretrained(base_dir)
    apply_lora(model, "all", 4, 8.0, 0.0, False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()                                # B = 0 would not show a lost adapter
    return model


def test_lora_checkpoint_references_the_base_and_refills_the_adapters(tmp_path, monkeypatch):
    from model.io import save_pretrained
    torch.manual_seed(0)
    base = save_pretrained(tiny(), tmp_path / "base")
    model = lora_on(base)
    path = ck.save_checkpoint(tmp_path, 3, model, {"step": 3}, 10, base_dir=base)
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "base.json", "trainable.safetensors",
                                                    "trainer_state.json", "trainer_state.safetensors"]
    ref = json.loads((path / "base.json").read_text())
    assert ref["path"] == str(base.resolve()) and ref["scheme"] == ck.SCHEME
    assert ref["config_sha256"] == independent_config_digest(base)
    assert ref["weights_sha256"] == independent_weights_digest(base)
    from safetensors import safe_open
    with safe_open(str(path / "trainable.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert keys and all(".lora_" in k for k in keys)        # adapters only, no base tensor
    assert (path / "trainable.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size / 4

    other = lora_on(base, seed=2)                             # same base, other adapter values
    assert ck.load_checkpoint(path, other, base_dir=base) == {"step": 3}
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k

    # beside the adapter files (the LoRA on_save, in PEFT's key format as the CLI writes them),
    # the adapters are stored once: in those
    from trainer.adapters import adapter_files
    lean = ck.save_checkpoint(tmp_path / "lean", 3, model, {"step": 3}, 10,
                              extra_files=adapter_files(model, None, peft_format=True), base_dir=base)
    with safe_open(str(lean / "trainable.safetensors"), "pt") as fh:
        assert list(fh.keys()) == []
    assert json.loads((lean / "base.json").read_text())["trainable_elsewhere"] == {
        k: "adapter_model.safetensors" for k in keys}
    third = lora_on(base, seed=3)
    ck.load_checkpoint(lean, third, base_dir=base)
    for (k, a), b in zip(model.state_dict().items(), third.state_dict().values()):
        assert torch.equal(a, b), k

    # the fingerprint is hashed once per process, then reused while size and mtime stand
    calls = []
    monkeypatch.setattr(ck, "_tensor_digests", lambda p, into: calls.append(p))
    ck.save_checkpoint(tmp_path, 4, model, {"step": 4}, 10, base_dir=base)
    assert calls == []

    monkeypatch.undo()
    with pytest.raises(ck.CheckpointError, match="resume it with --init_from .*base"):
        ck.load_checkpoint(path, other)
    torch.manual_seed(5)
    save_pretrained(tiny(), base)                             # the base changed under the run
    with pytest.raises(ck.CheckpointError, match=r"base.*differs from the one .*step_000003.*"
                                                 r"changed: the weights' values\)"):
        ck.load_checkpoint(path, other, base_dir=base)
    from model.lora import apply_lora
    fewer = load_pretrained(base)
    apply_lora(fewer, "q_proj", 4, 8.0, 0.0, False)
    ck._FINGERPRINTS.clear()
    json_ref = json.loads((path / "base.json").read_text())
    json_ref["sha256"] = ck.base_fingerprint(base)["sha256"]  # a matching base, other adapters
    (path / "base.json").write_text(json.dumps(json_ref))
    with pytest.raises(ck.CheckpointError, match="trainable tensors do not match"):
        ck.load_checkpoint(path, fewer, verify=False, base_dir=base)


# ---------------------------------------------------------------------- resume state: no pickle
def real_trainer_state() -> dict:
    """What trainer/loop.py saves, with real objects: AdamW after a step, the schedule, a
    GradScaler, every RNG (python, numpy, torch), plus the awkward values JSON lacks."""
    from trainer.optim import CosineSchedule
    from trainer.rng import rng_state
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = CosineSchedule(opt, 10, 2, 0.1)
    sched.apply(0)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return {"step": 1, "samples": 8, "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
            "scaler": scaler.state_dict(), "rng": [rng_state()], "best_val_loss": float("nan"),
            "wandb_id": None, "config": {"betas": [0.9, 0.95], "out_dir": "x"},
            "odd": {"$tensor": "not a reference", 3: (1, "a")}, "inf": float("-inf")}


def assert_same_tree(a, b, path="") -> None:
    """Equal values AND types: a tuple must come back a tuple (random.setstate insists)."""
    import numpy as np
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def test_resume_state_round_trips_exactly_without_pickle(tmp_path):
    import random

    import numpy as np

    from trainer import resume_state
    from trainer.rng import set_rng_state
    state = real_trainer_state()
    path = ck.save_checkpoint(tmp_path, 1, tiny(), state, 3)
    assert not (path / "trainer_state.pt").exists()
    json.loads((path / resume_state.JSON_NAME).read_text())          # plain JSON, no NaN literal
    back = ck.load_checkpoint(path, tiny())
    assert_same_tree(state, back)
    set_rng_state(back["rng"][0])                                    # the RNGs continue as saved
    drawn = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(state["rng"][0])
    assert drawn == (random.random(), np.random.rand(), torch.rand(1))
    with pytest.raises(TypeError, match="cannot store object at /x"):
        resume_state.encode({"x": object()})


def test_a_malicious_pickled_state_is_refused_and_nothing_runs(tmp_path, monkeypatch, capsys):
    """A handed-over checkpoint whose trainer_state.pt runs code when unpickled, with COMPLETE's
    manifest updated to match: resume refuses it in one line and the payload never runs."""
    import hashlib
    import pickle

    import trainer_driver

    from common.errors import run_cli
    marker, probe = tmp_path / "pwned", tmp_path / "probe"

    class Payload:
        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return exec, (f"open({str(self.target)!r}, 'w').write('ran')",)

    torch.load(_pickled(Payload(probe), tmp_path / "probe.pt"), weights_only=False)
    assert probe.exists()                       # the payload is real: a plain unpickle runs it

    out = tmp_path / "run"
    ckpt = ck.save_checkpoint(out, 2, trainer_driver_model(), {"step": 2}, 3)
    for name in ck.STATE_NAMES:                 # an attacker ships the old pickled format instead
        (ckpt / name).unlink()
    _pickled({"step": 2, "evil": Payload(marker)}, ckpt / "trainer_state.pt")
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
             for p in ckpt.iterdir() if p.name != ck.MARKER}
    (ckpt / ck.MARKER).write_text(json.dumps({"step": 2, "files": files}))
    assert ck.verify_checkpoint(ckpt)["step"] == 2                # the manifest is consistent

    monkeypatch.setattr(sys, "argv", ["trainer_driver.py", "--out_dir", str(out), "--device", "cpu",
                                      "--no-progress", "--no-plot", "--peak_tflops", "1",
                                      "--max_steps", "4", "--resume", "auto"])
    with pytest.raises(SystemExit) as stop:
        run_cli(trainer_driver.main)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {ckpt}/trainer_state.pt: refused: unpickling it would call exec, "
                   "which no resume state needs (a tampered or foreign file); nothing from it was "
                   "run. Resume only checkpoints you trust, or start fresh without --resume"]
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(1)) == 1   # (pickle itself untouched by the allow-list)


def trainer_driver_model() -> MiniMindLM:
    return MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.1))


def _pickled(obj, path):
    torch.save(obj, path)                       # torch.save pickles: __reduce__ is honoured
    return path


def test_old_pickled_state_with_numpy_rng_still_resumes(tmp_path):
    """Checkpoints written before this format hold trainer_state.pt (with NumPy's RNG state):
    read with weights_only=True and the NumPy allow-list, they resume as before."""
    import hashlib
    state = real_trainer_state()
    ckpt = ck.save_checkpoint(tmp_path, 1, tiny(), {}, 3)
    for name in ck.STATE_NAMES:
        (ckpt / name).unlink()
    torch.save(state, ckpt / "trainer_state.pt")
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
             for p in ckpt.iterdir() if p.name != ck.MARKER}
    (ckpt / ck.MARKER).write_text(json.dumps({"step": 1, "files": files}))
    assert_same_tree(state, ck.load_checkpoint(ckpt, tiny()))


def test_tampered_json_state_is_one_line(tmp_path):
    from common.errors import UserError
    path = ck.save_checkpoint(tmp_path, 1, tiny(), {"w": torch.ones(2)}, 3)
    tree = json.loads((path / "trainer_state.json").read_text())
    tree["state"]["w"] = {"$tensor": "elsewhere"}
    (path / "trainer_state.json").write_text(json.dumps(tree))
    with pytest.raises(UserError, match=r"trainer_state.json: refers to tensor 'elsewhere', which "
                                        r"trainer_state.safetensors lacks"):
        ck.load_checkpoint(path, tiny(), verify=False)


# ---------------------------------------------------------------------- byte-stable saves
def test_same_tensors_and_config_give_the_same_bytes(tmp_path):
    """safetensors writes header metadata in a HashMap's order, which varies even within one
    process; every file we write must not."""
    import safetensors.torch

    from model.io import save_pretrained, stable_safetensors_bytes, weights_bytes
    tensors = {"b": torch.arange(4.0), "a": torch.ones(2, dtype=torch.int64)}
    meta = {"format": "pt", "tied": "{}", "zeta": "1", "alpha": "é"}
    raw = {safetensors.torch.save(tensors, metadata=meta) for _ in range(20)}
    assert len(raw) > 1                         # the library alone: different bytes
    ours = {stable_safetensors_bytes(tensors, meta) for _ in range(20)}
    assert len(ours) == 1
    data = ours.pop()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(meta)
    assert (8 + n) % 8 == 0
    back = safetensors.torch.load(data)        # still a valid file, same tensors
    assert all(torch.equal(back[k], v) for k, v in tensors.items())

    model = tiny()
    assert len({weights_bytes(model) for _ in range(10)}) == 1
    first = {p.name: p.read_bytes() for p in save_pretrained(model, tmp_path / "a").iterdir()}
    for _ in range(5):
        again = {p.name: p.read_bytes() for p in save_pretrained(model, tmp_path / "b").iterdir()}
        assert again == first
    state = real_trainer_state()
    a = ck.save_checkpoint(tmp_path / "x", 1, model, state, 3)
    b = ck.save_checkpoint(tmp_path / "y", 1, model, state, 3)
    same = [p.name for p in a.iterdir() if p.name != ck.MARKER]
    assert len(same) == 4 and all((a / n).read_bytes() == (b / n).read_bytes() for n in same)


def test_resaving_the_base_keeps_a_lora_checkpoint_resumable(tmp_path):
    """The base is re-saved (same tensors, new mtime), then rewritten by the plain library with
    another header and tensor order: the LoRA checkpoint still resumes on it; a changed value
    is still refused."""
    import safetensors.torch

    from model.io import load_state_dict_file, save_pretrained
    torch.manual_seed(0)
    base = save_pretrained(tiny(), tmp_path / "base")
    weights = (base / "model.safetensors").read_bytes()
    model = lora_on(base)
    path = ck.save_checkpoint(tmp_path, 3, model, {"step": 3}, 10, base_dir=base)
    save_pretrained(load_pretrained(base), base)                   # re-saved: byte-stable
    assert (base / "model.safetensors").read_bytes() == weights
    sd = load_state_dict_file(base / "model.safetensors")
    sd.pop("lm_head.weight")
    safetensors.torch.save_file(dict(reversed(list(sd.items()))), str(base / "model.safetensors"),
                                metadata={"format": "pt", "tied": json.dumps(
                                    {"lm_head.weight": "model.embed_tokens.weight"}), "by": "other"})
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(reversed(list(config.items())))))
    assert (base / "model.safetensors").read_bytes() != weights
    other = lora_on(base, seed=2)
    assert ck.load_checkpoint(path, other, base_dir=base) == {"step": 3}
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    sd["model.norm.weight"][0] += 1e-3
    safetensors.torch.save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt", "tied": json.dumps(
        {"lm_head.weight": "model.embed_tokens.weight"})})
    with pytest.raises(ck.CheckpointError, match="changed: the weights' values"):
        ck.load_checkpoint(path, other, base_dir=base)


def test_old_base_reference_by_file_bytes_is_still_checked(tmp_path):
    import hashlib

    from model.io import save_pretrained
    base = save_pretrained(tiny(), tmp_path / "base")
    model = lora_on(base)
    path = ck.save_checkpoint(tmp_path, 3, model, {"step": 3}, 10, base_dir=base)
    files = {n: {"bytes": (base / n).stat().st_size,
                 "sha256": hashlib.sha256((base / n).read_bytes()).hexdigest()}
             for n in ("model.safetensors", "config.json")}
    old = {"path": str(base.resolve()), "files": files, "trainable_elsewhere": {},
           "sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}
    (path / "base.json").write_text(json.dumps(old))
    assert ck.load_checkpoint(path, lora_on(base, seed=2), verify=False, base_dir=base) == {"step": 3}
    (base / "config.json").write_text((base / "config.json").read_text() + " ")
    with pytest.raises(ck.CheckpointError, match="changed: config.json"):
        ck.load_checkpoint(path, lora_on(base, seed=2), verify=False, base_dir=base)
