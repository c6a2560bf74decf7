#!/usr/bin/env bash
# emfm quickstart: sets up .venv (the exact versions of requirements.lock) on first use, then
#   bash run.sh              -> the main job on the bundled real EM sample (pretrain, probe, export)
#   bash run.sh test         -> ruff (lint, formatting), then the test suite (what CI runs)
#   bash run.sh emfm ARGS... -> any emfm command inside the environment, e.g. bash run.sh emfm pretrain debug=tiny
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 python3.13 python3.12 python3.11 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "emfm needs Python >= 3.11 (none found on PATH; set PYTHON=/path/to/python3.11)" >&2; exit 2; }

stamp=.venv/.emfm-installed
if [ ! -x .venv/bin/python ]; then
  echo "[emfm] creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
# Re-install when the lock file or pyproject.toml changed since the last install: the exact versions
# of requirements.lock, then emfm itself (editable, no further dependencies).
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[emfm] installing the locked dependencies (first run: about a minute)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$stamp"
fi

cmd=${1:-main}
case "$cmd" in
  main)
    shift || true
    exec .venv/bin/emfm main "$@" ;;
  test)
    shift
    # Lint and formatting first, failing fast (outputs and data are excluded in pyproject.toml).
    if ! .venv/bin/ruff check .; then
      echo "[emfm] ruff check failed: fix the findings above (many: .venv/bin/ruff check --fix .)" >&2
      exit 1
    fi
    if ! .venv/bin/ruff format --check .; then
      echo "[emfm] ruff format --check failed: run .venv/bin/ruff format ." >&2
      exit 1
    fi
    # pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
    set +e
    .venv/bin/python -m pytest -x -q "$@"
    rc=$?
    [ $rc -eq 5 ] && echo "[emfm] pytest collected no tests" >&2
    exit $rc ;;
  emfm)
    shift
    exec .venv/bin/emfm "$@" ;;
  *)
    echo "usage: bash run.sh [main|test|emfm ARGS...]" >&2; exit 2 ;;
esac
