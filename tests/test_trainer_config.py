"""TrainConfig: CLI and YAML generated from the dataclass, precedence, subclassing, validation."""
from dataclasses import dataclass

import pytest

from trainer.config import ConfigError, TrainConfig, option, build_parser, parse_config


@dataclass
class StageConfig(TrainConfig):
    lr: float = 1e-5                                   # a stage's own default
    beta: float = option(0.15, "a stage-only option")
    use_thing: bool = option(False, "a stage-only flag")


def test_defaults_are_valid():
    TrainConfig().validate()


def test_cli_types_bools_lists_tuples():
    cfg = parse_config(TrainConfig, ["--lr", "3e-4", "--compile", "--no-progress", "--betas", "0.8", "0.9",
                                     "--data_path", "a.jsonl", "b.jsonl", "--max_steps", "7"], validate=False)
    assert cfg.lr == 3e-4 and cfg.compile is True and cfg.progress is False
    assert cfg.betas == (0.8, 0.9) and cfg.data_path == ["a.jsonl", "b.jsonl"] and cfg.max_steps == 7


def test_bare_resume_means_auto():
    assert parse_config(TrainConfig, ["--resume"]).resume == "auto"
    assert parse_config(TrainConfig, []).resume == ""


def test_yaml_then_cli_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.001\nbatch_size: 3\nbetas: [0.5, 0.6]\ncompile: 'true'\nbeta: 0.3\n")
    cfg = parse_config(StageConfig, ["--config", str(f), "--batch_size", "5"])
    assert cfg.lr == 0.001 and cfg.batch_size == 5 and cfg.betas == (0.5, 0.6)
    assert cfg.compile is True and cfg.beta == 0.3


def test_unknown_yaml_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        parse_config(TrainConfig, ["--config", str(f)])
    f.write_text("batch_sise: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        parse_config(TrainConfig, ["--config", str(f)])


def test_subclass_defaults_and_extra_flags():
    cfg = parse_config(StageConfig, ["--use_thing"])
    assert cfg.lr == 1e-5 and cfg.beta == 0.15 and cfg.use_thing is True
    assert "--beta" in build_parser(StageConfig).format_help()


def test_unknown_cli_flag_fails():
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--nope", "1"])


@pytest.mark.parametrize("overrides, message", [
    ({"grad_accum": 0}, "grad_accum must be >= 1"),
    ({"eval_every": 10}, "needs validation data"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"max_steps": 0, "epochs": 0}, "max_steps > 0 or epochs > 0"),
    ({"resume": "/no/such/ckpt"}, "no such checkpoint folder"),
    ({"data_path": ["/no/such.jsonl"]}, "no such file"),
    ({"wandb": "maybe"}, "wandb must be one of"),
])
def test_validate_rejects(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides).validate()


def test_validate_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        TrainConfig(grad_accum=0, batch_size=0, lr=-1).validate()
    text = str(err.value)
    assert "grad_accum" in text and "batch_size" in text and "lr must be > 0" in text
