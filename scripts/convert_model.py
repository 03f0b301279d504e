"""Convert models between our folder format, Hugging Face transformers, upstream MiniMind and GGUF.

    python scripts/convert_model.py export --model out/sft --out hf_out [--lora out/lora]
    python scripts/convert_model.py import --hf hf_dir --out out/imported
    python scripts/convert_model.py import-minimind --pth full_sft_512.pth --preset minimind2-small --out out/mm
    python scripts/convert_model.py gguf --model out/sft --out model.gguf [--lora out/lora]

The command line lives in ``convert/cli.py``; the mappings and their reasons in ``convert/``.
"""

from common.errors import run_cli
from convert.cli import main

if __name__ == "__main__":
    run_cli(main)
