#!/usr/bin/env bash
# CI job: the LiteRT runner backend with the older `tflite-runtime` package in place of ai-edge-litert
# (what many Raspberry Pi OS setups have). A separate small venv: tflite-runtime + numpy<2 (its ABI) +
# psutil + pytest, and edgeship installed with --no-deps, so neither ai-edge-litert nor torch is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TFLITE_RUNTIME_VENV:-.venv-tflite-runtime}"
PY="${PYTHON:-python3}"
# tflite-runtime's last release (2.14) ships wheels for CPython 3.8-3.11 only
if ! "$PY" -c 'import sys; sys.exit(0 if (3, 8) <= sys.version_info[:2] <= (3, 11) else 1)'; then
  echo "tflite-runtime-job: $PY is $("$PY" -V 2>&1); tflite-runtime has wheels for Python 3.8-3.11 only: set PYTHON" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "tflite-runtime==2.14.0" "numpy<2" "psutil>=5.9" "pytest>=8"
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
for absent in ("ai_edge_litert", "torch"):
    if importlib.util.find_spec(absent) is not None:
        sys.exit(f"tflite-runtime-job: {absent} is installed in this venv; the job must run without it")
PY
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -q tests/profiling/test_tflite_backend.py tests/profiling/test_tflite_nosig.py "$@"
