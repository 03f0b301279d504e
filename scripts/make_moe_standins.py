"""Tiny random stand-ins of the MoE families the commonsense recipes fine-tune, saved by
transformers itself (see ``convert/standins.py``).

    python scripts/make_moe_standins.py --out out/standins [--family qwen3moe]
"""

from common.errors import run_cli
from convert.standins import main

if __name__ == "__main__":
    run_cli(main)
