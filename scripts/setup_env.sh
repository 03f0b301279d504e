#!/usr/bin/env bash
# Creates ./.venv (once) and installs the pinned requirements into it.
# Idempotent: a second call only checks that the pins are satisfied.
# torch is pinned exactly: a looser pin makes pip fetch the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.txt requirements-serve.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q -r requirements.txt -r requirements-serve.txt
  # kt-kernel pins an old CUDA torch; its .so files do not link libtorch, so install it alone.
  .venv/bin/pip install -q --no-deps kt-kernel==0.7.2 || echo "note: kt-kernel not installed; KT tests will skip"
  .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi
