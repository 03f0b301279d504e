"""The model folder (model/io.py): one writer, one reader, one tied-weight rule.

The rule is checked against transformers (an independent reader and writer of the same names)
and against folders written by the code this module replaced, copied here verbatim in spirit:
the old model.io (tied lm_head dropped, no metadata) and the old trainer/checkpoint.py (tied
tensor stored once, aliases in the "tied" metadata, sorted config.json).
"""
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from common.errors import ModelFolderError, ModelNotFoundError
from model.config import MiniMindConfig
from model.io import (is_model_folder, load_pretrained, load_weights, read_config, save_pretrained,
                      weights_bytes)
from model.model import MiniMindLM
from trainer import checkpoint as ck

IDS = torch.randint(0, 6400, (2, 7), generator=torch.Generator().manual_seed(1))


def tiny(preset="tiny", **kw) -> MiniMindLM:
    torch.manual_seed(0)
    return MiniMindLM(MiniMindConfig.from_preset(preset, **kw)).eval()


def same_logits(a, b):
    torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------- the writers this replaced
def old_io_save(model, out):
    """model.io before the merge: lm_head dropped when tied, metadata {"format": "pt"} only."""
    out.mkdir(parents=True)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    safetensors.torch.save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")


def old_checkpoint_save(model, out):
    """trainer/checkpoint.py before the merge: shared storage stored once + "tied" metadata."""
    out.mkdir(parents=True)
    tensors, aliases, seen = {}, {}, {}
    state = model.state_dict()
    for name in sorted(state, key=lambda n: n.startswith("lm_head")):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().float().contiguous()
    data = safetensors.torch.save(tensors, metadata={"format": "pt", "tied": json.dumps(aliases)})
    (out / "model.safetensors").write_bytes(data)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))


@pytest.mark.parametrize("writer", [old_io_save, old_checkpoint_save])
@pytest.mark.parametrize("tied", [True, False])
def test_folders_written_by_the_old_code_still_load(tmp_path, writer, tied):
    model = tiny(tie_word_embeddings=tied)
    writer(model, tmp_path / "old")
    loaded = load_pretrained(tmp_path / "old").eval()
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    same_logits(loaded, model)
    into = tiny(tie_word_embeddings=tied)
    torch.nn.init.zeros_(into.model.embed_tokens.weight)
    ck.load_weights(tmp_path / "old", into)            # the trainer's init_from path
    same_logits(into, model)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_save_load_round_trip_strict(tmp_path, preset):
    model = tiny(preset)
    assert not is_model_folder(tmp_path / "ckpt")
    save_pretrained(model, tmp_path / "ckpt")
    assert is_model_folder(tmp_path / "ckpt") and read_config(tmp_path / "ckpt") == model.config
    loaded = load_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    same_logits(loaded, model)
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert keys == set(model.state_dict()) - {"lm_head.weight"}     # the tied head stored once
    assert json.loads(meta["tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}


def test_untied_head_is_stored_and_its_absence_is_a_clear_error(tmp_path):
    model = tiny(tie_word_embeddings=False)
    save_pretrained(model, tmp_path / "u")
    with safe_open(str(tmp_path / "u" / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" in fh.keys() and json.loads(fh.metadata()["tied"]) == {}
    same_logits(load_pretrained(tmp_path / "u").eval(), model)
    sd = safetensors.torch.load_file(str(tmp_path / "u" / "model.safetensors"))
    del sd["lm_head.weight"]
    safetensors.torch.save_file(sd, str(tmp_path / "u" / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=r"model.safetensors: weights do not match.*lm_head"):
        load_pretrained(tmp_path / "u")


def test_tied_pair_stored_twice_must_agree(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path / "t")
    file = tmp_path / "t" / "model.safetensors"
    sd = dict(model.state_dict())                      # both tied keys, as an upstream .pth has
    safetensors.torch.save_file({k: v.clone() for k, v in sd.items()}, str(file))
    same_logits(load_pretrained(tmp_path / "t").eval(), model)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["lm_head.weight"] += 1.0
    safetensors.torch.save_file(sd, str(file))
    with pytest.raises(ModelFolderError, match="tied in the model .* but differ in the file"):
        load_pretrained(tmp_path / "t")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        load_weights(tmp_path / "missing", tiny())
    model = tiny()
    save_pretrained(model, tmp_path / "c")
    os.remove(tmp_path / "c" / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="model.safetensors: weights file not found"):
        load_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelFolderError, match="model.safetensors: unreadable or corrupt"):
        load_pretrained(tmp_path / "c")
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(sd, str(tmp_path / "c" / "model.safetensors"),
                                metadata={"tied": json.dumps({"lm_head.weight": "nope"})})
    with pytest.raises(ModelFolderError, match="ties lm_head.weight to nope, which the file lacks"):
        load_pretrained(tmp_path / "c")


def test_checkpoint_model_files_are_the_save_pretrained_files(tmp_path):
    model = tiny("tiny-moe")
    folder = save_pretrained(model, tmp_path / "plain")
    ckpt = ck.save_checkpoint(tmp_path / "run", 3, model, {"step": 3}, keep_last=2)
    assert (ckpt / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    # not byte-equal: safetensors writes its header's metadata map in a random order
    files = [ckpt / "model.safetensors", folder / "model.safetensors"]
    in_memory = safetensors.torch.load(weights_bytes(model))
    for file in files:
        with safe_open(str(file), "pt") as fh:
            assert fh.metadata() == {"format": "pt", "tied": '{"lm_head.weight": "model.embed_tokens.weight"}'}
        on_disk = safetensors.torch.load_file(str(file))
        assert on_disk.keys() == in_memory.keys()
        assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
    same_logits(load_pretrained(ckpt).eval(), model)


def test_lora_checkpoint_is_refused_with_a_hint(tmp_path):
    from model.lora import apply_lora
    model = tiny()
    apply_lora(model, ["q_proj"], rank=2, alpha=4.0)
    ckpt = ck.save_checkpoint(tmp_path, 1, model, {"step": 1}, keep_last=1)
    with pytest.raises(ModelFolderError, match="LoRA adapter tensors"):
        load_pretrained(ckpt)
    again = tiny()
    apply_lora(again, ["q_proj"], rank=2, alpha=4.0)
    ck.load_checkpoint(ckpt, again)                    # resume into the adapted model is exact
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------- transformers as reference
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_reads_our_file_and_we_read_theirs(tmp_path, tied):
    """Our weights file beside the HF config, loaded by transformers itself: a tied head must be
    re-tied by transformers, an untied one read from the file. Then transformers' own
    save_pretrained output (its tied-weight rule) loaded by us."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from convert.hf import hf_config_from_ours
    model = tiny(tie_word_embeddings=tied)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)    # a dropped final norm would show
    save_pretrained(model, tmp_path / "ours")
    (tmp_path / "ours" / "config.json").write_text(json.dumps(hf_config_from_ours(model.config)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS).logits, rtol=0, atol=1e-4)
    hf.save_pretrained(tmp_path / "theirs")
    with safe_open(str(tmp_path / "theirs" / "model.safetensors"), "pt") as fh:
        assert ("lm_head.weight" in fh.keys()) == (not tied)
    ours = tiny(tie_word_embeddings=tied)
    torch.nn.init.zeros_(ours.lm_head.weight)
    load_weights(tmp_path / "theirs" / "model.safetensors", ours)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    same_logits(ours, model)
