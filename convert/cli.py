"""Convert models between our folder format, Hugging Face transformers, upstream MiniMind and GGUF.

Scope: the command line over ``convert/hf.py`` (all mappings and their reasons live there).

    python scripts/convert_model.py export --model out/sft --out hf_out \
        [--lora out/lora] [--dtype bfloat16] [--max_shard_size 5GB]
    python scripts/convert_model.py import --hf hf_dir --out out/imported
    python scripts/convert_model.py import-minimind --pth full_sft_512.pth \
        --preset minimind2-small --out out/mm
    python scripts/convert_model.py gguf --model out/sft --out model.gguf [--lora out/lora] \
        [--outtype f32|f16|bf16|q8_0|q4_0|...|q4_k_m]

``export`` picks the transformers class whose maths equals the config (Llama, Qwen3, Qwen3-MoE,
Qwen2-MoE, Mixtral, GraniteMoeShared, DeepSeek-V2 or DeepSeek-V3) and refuses, naming the reason,
when none does. ``import`` converts single-file and sharded safetensors checkpoints tensor by
tensor, so memory stays at about one shard whatever the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import UserError
from convert.gguf import OUTTYPES, check_outtype, export_gguf
from convert.hf import export_hf, find_tokenizer_dir, import_hf_to_folder
from convert.minimind import load_minimind_pth, resolve_config
from inference import load_for_inference
from model.io import save_pretrained
from model.model import MiniMindLM


def _load(model_dir: str, lora_dir: str | None) -> MiniMindLM:
    """Our model folder in fp32 on the CPU, a LoRA adapter merged in when one is given (a plain
    MiniMindLM: no lora_A/lora_B keys reach the exported state dict)."""
    return load_for_inference(model_dir, lora_dir, device="cpu", dtype="fp32")[0]


def cmd_export(args: argparse.Namespace) -> None:
    model = _load(args.model, args.lora)
    tok = args.tokenizer or find_tokenizer_dir(args.model)
    out = export_hf(model, args.out, tokenizer_dir=tok, dtype=args.dtype,
                    max_shard_bytes=parse_size(args.max_shard_size))
    arch = json.loads((Path(out) / "config.json").read_text())["architectures"][0]
    print(f"wrote {out} ({arch}, tokenizer from {tok})")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str | None) -> int | None:
    """'5GB', '500MB', '2GiB' or a byte count → bytes (None stays None: one file)."""
    if text is None:
        return None
    number = text.strip().upper().rstrip("BIGKM") or "0"
    unit = text.strip().upper()[len(number):]
    try:
        size = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise ValueError(f"--max_shard_size {text!r}: expected a size such as 5GB, 500MB or 2GiB"
                         ) from None
    if size <= 0:
        raise ValueError(f"--max_shard_size {text!r} must be positive")
    return size


def cmd_import(args: argparse.Namespace) -> None:
    print(f"wrote {import_hf_to_folder(args.hf, args.out)}")


def cmd_import_minimind(args: argparse.Namespace) -> None:
    config = resolve_config(args.preset, args.config)
    model = load_minimind_pth(args.pth, config)
    out = save_pretrained(model, args.out)
    print(f"wrote {out} ({model.config.num_parameters() / 1e6:.2f}M parameters)")


def cmd_gguf(args: argparse.Namespace) -> None:
    outtype = (args.outtype or {"float32": "f32", "float16": "f16", None: "f32"}[args.dtype]).lower()
    check_outtype(outtype)   # before loading: a typo costs one line, not a model load
    model = _load(args.model, args.lora)   # convert.gguf.gguf_arch refuses what llama.cpp can't run
    tok = args.tokenizer or find_tokenizer_dir(args.model)
    print(f"wrote {export_gguf(model, args.out, tokenizer_dir=tok, outtype=outtype)} ({outtype})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Convert between our model folders, Hugging Face transformers folders, "
                    "upstream MiniMind .pth files and GGUF (llama.cpp / Ollama).")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="our folder → transformers folder (safetensors + config + "
                                      "tokenizer), loadable with AutoModelForCausalLM")
    p.add_argument("--model", required=True, help="our model folder (model.safetensors + config.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--lora", help="LoRA adapter folder to merge into the weights before export")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default float32)")
    p.add_argument("--tokenizer", help="tokenizer folder to copy (default: the model folder's own "
                                       "tokenizer files, else the shipped model/tokenizer)")
    p.add_argument("--max_shard_size", help="split the weights into Hub-style shards of at most "
                                            "this size (e.g. 5GB) plus an index.json")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="transformers folder (Llama, Qwen3, Qwen3-MoE, Qwen2-MoE, "
                                      "Mixtral, GraniteMoeShared, DeepSeek-V2/V3; single or "
                                      "sharded safetensors) → our folder")
    p.add_argument("--hf", required=True, help="transformers model folder (config.json + weights)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("import-minimind", help="upstream MiniMind .pth state dict → our folder")
    p.add_argument("--pth", required=True, help="upstream checkpoint (torch.save of a state dict)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model sizes from a preset, e.g. minimind2-small")
    src.add_argument("--config", help="model sizes from our config.json")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_import_minimind)

    p = sub.add_parser("gguf", help="our folder → one .gguf file for llama.cpp / Ollama "
                                    "(llama, qwen3, qwen3moe, qwen2moe, deepseek2 architectures)")
    p.add_argument("--model", required=True, help="our model folder")
    p.add_argument("--out", required=True, help="output .gguf file")
    p.add_argument("--lora", help="LoRA adapter folder to merge before export")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--outtype", help=f"type of the weight matrices, llama.cpp's names: "
                      f"{', '.join(OUTTYPES)} (default f32; norms and the MoE router stay f32; "
                      "the K-quants need llama-cpp-python)")
    kind.add_argument("--dtype", choices=["float32", "float16"], help="same as --outtype f32|f16")
    p.add_argument("--tokenizer", help="tokenizer folder (default as for export)")
    p.set_defaults(func=cmd_gguf)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)  # ConversionError, model and adapter errors are UserErrors: run_cli's
    except (OSError, json.JSONDecodeError) as e:  # a --config / --pth path unreadable or not JSON
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from e
