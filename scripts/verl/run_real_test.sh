#!/usr/bin/env bash
# Runs the real-verl test of the sparsesync checkpoint-engine backend (tests/verl_real/) in the verl venv.
#
# Usage: scripts/verl/run_real_test.sh [PYTEST ARGS...]         e.g.  -k missing   or   -x
#
# 1. copies the checkout's sources to a snapshot directory (default; SPARSESYNC_VERL_SNAPSHOT=0 uses the checkout
#    itself, whose native library the editable install then rebuilds in place),
# 2. builds or reuses the venv with make_venv.sh (torch 2.13.0 CPU + verl 0.9.1 without GPU extras; see that
#    script's variables: SPARSESYNC_VERL_VENV, SPARSESYNC_VERL_PYTHON, SPARSESYNC_VERL_PIP_ARGS,
#    SPARSESYNC_VERL_REBUILD) and installs the snapshot into it (editable, --no-deps),
# 3. runs `pytest tests/verl_real` with the venv's python and prints how long each part took.
# Exit status: pytest's (0 = passed).
set -Eeuo pipefail
T0=$SECONDS
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
PROJECT=$CHECKOUT
if [[ "${SPARSESYNC_VERL_SNAPSHOT:-1}" == 1 ]]; then
  PROJECT=${SPARSESYNC_VERL_SNAPSHOT_DIR:-${TMPDIR:-/tmp}/sparsesync-verl-snapshot}
  mkdir -p "$PROJECT"
  # copy sources only (no .git, no build outputs); a rerun refreshes the copy in place and keeps the snapshot's
  # own native build, which make_venv.sh redoes when the native sources changed
  (cd "$CHECKOUT" && tar --exclude=.git --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude='sparsesync/*.so' -cf - .) | (cd "$PROJECT" && tar -xf -)
  echo "run_real_test.sh: snapshot of $CHECKOUT in $PROJECT" >&2
fi
PY=$("$SCRIPT_DIR/make_venv.sh" "$PROJECT" | tail -n1)
T1=$SECONDS
echo "run_real_test.sh: venv ready in $((T1 - T0)) s ($PY)" >&2
cd "$PROJECT"
rc=0
"$PY" -m pytest -q -p no:cacheprovider -s tests/verl_real "$@" || rc=$?
echo "run_real_test.sh: pytest tests/verl_real exit $rc in $((SECONDS - T1)) s; total $((SECONDS - T0)) s" >&2
exit $rc
