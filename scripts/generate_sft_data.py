"""Black-box distillation, step 1: a teacher model answers prompts; the answers become SFT data.

    python scripts/generate_sft_data.py --teacher out/sft_big/final --prompts prompts.jsonl \
        --out data/distilled_sft.jsonl --max_new_tokens 256 --temperature 0.7 --num_samples 2

The prompt formats, the filtering and the options are described in ``dataset.generate_sft``.
"""

from dataset.generate_sft import main

if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
