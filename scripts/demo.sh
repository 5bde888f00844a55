#!/usr/bin/env bash
# The README's main command: set-up, then the main job on the embedded default model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
. .venv/bin/activate
python -m edit_runtime.demo "$@"
