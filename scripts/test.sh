#!/usr/bin/env bash
# The whole test suite: sets up $VENV (default .venv) if needed, then runs pytest.
# GPU tests run when CUDA is present and are skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
