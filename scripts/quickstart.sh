#!/usr/bin/env bash
# The main job on a fresh machine: sets up ./.venv if needed, then runs the whole pipeline
# (data → tokenizer → pretrain → SFT → LoRA → DPO → distillation, evaluated after each stage)
# on data the project generates. Extra flags go to scripts/quickstart.py (e.g. --scale smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/quickstart.py "$@"
