"""finetuning_type freeze (trainer/adapters.py): which parameters train for each
freeze_trainable_layers / freeze_trainable_modules / freeze_extra_modules, bad names as user
errors, and train_full_sft.py with it: only the chosen layers change, every checkpoint holds
them alone plus a reference to the base, and out_dir/final is a whole model folder."""
import json

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from dataset import synthetic
from model.config import MiniMindConfig
from model.io import load_pretrained, save_pretrained
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from trainer.adapters import FinetuningChoice, freeze_trainable
from trainer.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def model4() -> MiniMindLM:
    torch.manual_seed(0)
    return MiniMindLM(MiniMindConfig.from_preset("tiny", num_hidden_layers=4, dropout=0.0))


def names(model, **options) -> set[str]:
    chosen = {id(p) for p in freeze_trainable(model, FinetuningChoice(finetuning_type="freeze", **options))}
    return {n for n, p in model.named_parameters() if id(p) in chosen}


def test_layer_and_module_choice():
    m = model4()
    layer_of = lambda n: int(n.split(".")[2])   # noqa: E731  model.layers.<i>.
    last2 = names(m, freeze_trainable_layers=2)
    assert {layer_of(n) for n in last2} == {2, 3}
    assert last2 == {n for n, _ in m.named_parameters() if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert {layer_of(n) for n in names(m, freeze_trainable_layers=-1)} == {0}
    mlp = names(m, freeze_trainable_layers=1, freeze_trainable_modules="mlp")
    assert mlp == {f"model.layers.3.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    qv = names(m, freeze_trainable_layers=1, freeze_trainable_modules="q_proj,v_proj")
    assert qv == {"model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.v_proj.weight"}
    extra = names(m, freeze_trainable_layers=1, freeze_trainable_modules="mlp", freeze_extra_modules="norm")
    assert extra - mlp == {"model.norm.weight"}        # the final norm, not the layers' norms


@pytest.mark.parametrize("options, message", [
    ({"freeze_trainable_layers": 5}, "has 4 layers"),
    ({"freeze_trainable_modules": "mpl"}, "no module 'mpl'"),
    ({"freeze_extra_modules": "head"}, "no module 'head'"),
])
def test_bad_choices_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        names(model4(), **options)


def test_config_checks():
    with pytest.raises(ConfigError, match="init_from"):
        FinetuningChoice(finetuning_type="freeze").validate()
    with pytest.raises(ConfigError, match="must not be 0"):
        FinetuningChoice(finetuning_type="freeze", freeze_trainable_layers=0).validate()


def test_sft_stage_trains_only_the_chosen_layers_and_checkpoints_reference_the_base(tmp_path, monkeypatch):
    import train_full_sft
    base = tmp_path / "base"
    save_pretrained(model4(), base)
    data = tmp_path / "sft.jsonl"
    synthetic.write_jsonl(synthetic.sft_conversations(16, seed=0), data)
    monkeypatch.setattr(train_full_sft, "load_tokenizer", lambda cfg: Tokenizer.from_dir(None))
    monkeypatch.setattr("sys.argv", [
        "train_full_sft.py", "--init_from", str(base), "--data_path", str(data), "--out_dir",
        str(tmp_path / "run"), "--finetuning_type", "freeze", "--freeze_trainable_layers", "1",
        "--freeze_extra_modules", "norm", "--seq_len", "128", "--batch_size", "4", "--max_steps", "2",
        "--save_every", "2", "--lr", "1e-3", "--no-progress", "--no-plot", "--dtype", "fp32",
        "--peak_tflops", "1"])
    train_full_sft.main()
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    want = {k for k in before if k.startswith("model.layers.3.")} | {"model.norm.weight"}
    assert changed == want
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert "model.safetensors" not in {p.name for p in ckpt.iterdir()}
    assert set(load_file(ckpt / "trainable.safetensors")) == want
    assert json.loads((ckpt / "base.json").read_text())["path"] == str(base.resolve())
    load_pretrained(tmp_path / "run" / "final")          # a whole model folder, loaded strictly
