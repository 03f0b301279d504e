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
