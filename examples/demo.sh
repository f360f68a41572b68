#!/usr/bin/env bash
# Set everything up, then run the main job on the testbed model (examples/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" examples/demo.py "$@"
