#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job on built-in defaults (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source "${ASL_VENV:-.venv}/bin/activate"
exec asl train "$@"
