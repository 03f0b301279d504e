#!/usr/bin/env bash
# Creates ./.venv (once) and installs the pinned requirements into it.
# Idempotent: a second call only checks that the pins are satisfied.
# torch is pinned exactly: a looser pin makes pip fetch the multi-GB CUDA build.
# kt-kernel (optional, requirements-kt.txt) has its own stamp, written only once it imports:
# a failed install is reported, never recorded, and the next run tries again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pyproject.toml is hashed too: its package list feeds the editable install.
stamp=.venv/.installed-$(cat requirements.txt requirements-serve.txt pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q -r requirements.txt -r requirements-serve.txt
  .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi
kt_stamp=.venv/.installed-kt-$(sha1sum requirements-kt.txt | cut -c1-12)
kt_imports() { .venv/bin/python -c "import kt_kernel" >/dev/null 2>&1; }
if [ ! -f "$kt_stamp" ] || ! kt_imports; then
  # --no-deps: kt-kernel pins an old CUDA torch; its .so files do not link libtorch.
  if .venv/bin/pip install -q --no-deps -r requirements-kt.txt && kt_imports; then
    touch "$kt_stamp"
  else
    rm -f "$kt_stamp"
    echo "note: kt-kernel is not installed (or does not import); --moe_backend kt is unavailable" \
         "and the kt tests will skip. setup_env.sh retries it on the next run." >&2
  fi
fi
