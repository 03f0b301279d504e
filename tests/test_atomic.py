"""Failed writes (disk full, unwritable path): every writer raises common.errors.WriteError naming
the file (one line at the CLI), and leaves no half-written folder or temporary file behind.
The training loop's checkpoints are covered in test_resume.py (ENOSPC injected mid-checkpoint)."""
import errno

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from common.atomic import atomic_write_bytes
from common.errors import UserError, WriteError, one_line, writing
from model.config import MiniMindConfig
from model.model import MiniMindLM

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def test_writing_names_the_target_and_leaves_other_errors_alone(tmp_path):
    with pytest.raises(WriteError) as caught, writing(tmp_path / "out.bin"):
        raise OSError(errno.ENOSPC, "No space left on device")        # a write: no file name
    assert str(caught.value) == f"{tmp_path}/out.bin: cannot write: No space left on device"
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, (UserError, OSError))
    with pytest.raises(FileNotFoundError), writing(tmp_path / "out.bin"):
        open(tmp_path / "missing-source")                            # a read of another file


def test_atomic_write_into_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match=r"file/x.json: cannot write: File exists"):
        atomic_write_bytes(tmp_path / "file" / "x.json", b"{}")


def _full_disk_save_file(tensors, filename, metadata=None):
    """What safetensors raises on a full disk (seen on a 1 MB tmpfs), after writing part."""
    with open(filename, "wb") as fh:
        fh.write(b"\0" * 100)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_final_save_on_a_full_disk_removes_the_new_folder(tmp_path, monkeypatch):
    import model.io as io
    from trainer import checkpoint as ck
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    done = ck.save_checkpoint(tmp_path, 4, model, {"step": 4}, 3)
    monkeypatch.setattr(io, "save_file", _full_disk_save_file)
    with pytest.raises(WriteError) as caught, ck.resume_hint_on_write_error(tmp_path):
        io.save_pretrained(model, tmp_path / "final")
    assert one_line(caught.value) == (
        f"{tmp_path}/final/model.safetensors: cannot write: No space left on device; last complete "
        f"checkpoint: {done} (free space, then rerun with --resume auto)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]   # no final/, no temp file

    monkeypatch.undo()
    io.save_pretrained(model, tmp_path / "final")
    before = {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()}
    monkeypatch.setattr(io, "save_file", _full_disk_save_file)
    with pytest.raises(WriteError):
        io.save_pretrained(model, tmp_path / "final")
    assert {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()} == before   # kept whole


def test_adapter_export_on_a_full_disk_removes_the_new_folder(tmp_path, monkeypatch):
    import model.io as io
    from model.lora import apply_lora, save_adapter
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    apply_lora(model, "q_proj", 2, 4.0, 0.0, False)
    monkeypatch.setattr(io, "save_file", _full_disk_save_file)
    with pytest.raises(WriteError, match="adapter/adapter_model.safetensors: cannot write: No space"):
        save_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_token_cache_on_a_full_disk_leaves_no_partial_entry(tmp_path, monkeypatch):
    from dataset.cache import TokenCache

    def full(*args, **kwargs):
        raise ENOSPC
    monkeypatch.setattr(np, "save", full)
    with pytest.raises(WriteError, match=r"cache/k1: cannot write: No space left on device"):
        TokenCache(tmp_path / "cache").save("k1", {"ids": np.arange(4)}, {})
    assert list((tmp_path / "cache").iterdir()) == []


def test_metrics_into_an_unwritable_path_is_one_line(tmp_path):
    from trainer.logging import RunLogger
    logger = RunLogger(tmp_path, True, 10, 0, {}, progress=False)
    logger.path.mkdir()                             # metrics.jsonl cannot be opened for append
    with pytest.raises(WriteError, match=r"metrics.jsonl: cannot write: Is a directory"):
        logger.log(1, {"loss": 1.0})


def test_safetensors_errors_that_are_not_io_stay_bugs(tmp_path):
    from model.io import stable_save_file
    t = torch.zeros(2)
    with pytest.raises(Exception) as caught:                       # shared storage: a caller bug
        stable_save_file({"a": t, "b": t}, tmp_path / "x.safetensors", {"format": "pt"})
    assert not isinstance(caught.value, UserError)
