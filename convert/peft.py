"""LoRA adapters in PEFT's file format, for ``PeftModel.from_pretrained`` on the transformers
export of the base (``convert.hf.export_hf``).

Writing lives here, not in ``model/lora.py``, because whether an adapter has an exact PEFT
equivalent depends on how the transformers export names and fuses the base's layers.
``model.lora.load_adapter`` reads both formats (reading needs only PEFT's key prefix).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from model.lora import (PEFT_METADATA_KEY, PEFT_PREFIX, adaptable_linears, adapter_settings,
                        adapter_tensors, leaf_name, native_adapter_config, write_adapter_files)
from model.model import MiniMindLM

from .hf import ConversionError, choose_hf_model_type, hf_state_dict_from_ours


def _peft_target_modules(model: nn.Module, modules: list[str]) -> list[str]:
    """Leaf names when they select exactly ``modules`` (readable), else the full names (exact)."""
    leaves = sorted({leaf_name(n) for n in modules})
    same = [n for n in adaptable_linears(model) if leaf_name(n) in leaves] == modules
    return leaves if same else list(modules)


def peft_incompatibility(model: nn.Module) -> str | None:
    """Why the model's adapters have no exact PEFT equivalent on the transformers export of its
    base, or None when ``save_peft_adapter`` is exact: every adapted layer is an ``nn.Linear``
    that the export keeps under the same name."""
    modules = adapter_settings(model).modules
    experts = [n for n in modules if ".experts." in n or ".shared_experts." in n]
    if experts:
        return (f"{experts[0]} and {len(experts) - 1} more expert layers have no PEFT equivalent "
                "(transformers fuses the routed experts into 3-D tensors and has no shared "
                "experts)")
    try:
        choose_hf_model_type(model.config)
    except ConversionError as e:
        return f"the base has no transformers export, so no PEFT equivalent ({e})"
    with torch.device("meta"):  # key names only
        exported = hf_state_dict_from_ours(model.config, MiniMindLM(model.config).state_dict())
    renamed = [n for n in modules if f"{n}.weight" not in exported]
    if renamed:
        return (f"{renamed[0]} and {len(renamed) - 1} more layers are renamed or fused in the "
                "transformers export, so no PEFT equivalent")
    return None


def save_peft_adapter(model: nn.Module, out_dir: str | Path,
                      base_model: str | Path | None = None) -> Path:
    """Writes the adapter with keys ``base_model.model.<name>.lora_A.weight`` and a PEFT
    LoraConfig. Our own config rides along in the safetensors metadata, so ``load_adapter`` still
    checks the base. Refused where ``peft_incompatibility`` names a reason."""
    reason = peft_incompatibility(model)
    if reason:
        raise ValueError(f"save_peft_adapter: {reason}; save natively (model.lora.save_adapter) "
                         "or export the merged model")
    settings = adapter_settings(model)
    native = native_adapter_config(model, settings, base_model)
    tensors = {f"{PEFT_PREFIX}{k}.weight": v for k, v in adapter_tensors(model).items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": native["base_model"]["name_or_path"],
              "r": settings.rank, "lora_alpha": settings.alpha,
              "lora_dropout": settings.dropout, "use_rslora": settings.use_rslora,
              "target_modules": _peft_target_modules(model, settings.modules),
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "use_dora": False}
    return write_adapter_files(out_dir, tensors, config, {PEFT_METADATA_KEY: json.dumps(native)})
