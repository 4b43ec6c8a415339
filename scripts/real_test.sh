#!/usr/bin/env bash
# Runs a real-engine test (tests/<ENGINE>_real/) in that engine's cached virtual environment; the per-engine entry
# points scripts/vllm/run_real_test.sh and scripts/verl/run_real_test.sh call this.
#
# Usage: scripts/real_test.sh vllm|verl [PYTEST ARGS...]
#
# 1. with SPARSESYNC_<ENGINE>_SNAPSHOT=1 (default 1 for verl, 0 for vllm), copies the checkout's sources to a snapshot
#    directory (SPARSESYNC_<ENGINE>_SNAPSHOT_DIR, default $TMPDIR/sparsesync-<engine>-snapshot) that the venv then
#    points at, leaving the checkout's own native build untouched; a rerun refreshes the copy in place and keeps the
#    snapshot's native build (make_venv.sh redoes it when the native sources changed);
# 2. builds or reuses the venv with scripts/<engine>/make_venv.sh (see its variables) and installs the project
#    (editable, --no-deps);
# 3. runs `pytest tests/<engine>_real` with the venv's python and prints how long each part took.
# Exit status: pytest's (0 = passed).
set -Eeuo pipefail
ENGINE=${1:-}
case "$ENGINE" in
  vllm) SNAPSHOT_DEFAULT=0 ;;
  verl) SNAPSHOT_DEFAULT=1 ;;
  *) echo "usage: scripts/real_test.sh vllm|verl [PYTEST ARGS...]" >&2; exit 2 ;;
esac
shift
T0=$SECONDS
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$SCRIPTS/.." && pwd -P)
UPPER=$(echo "$ENGINE" | tr '[:lower:]' '[:upper:]')
SNAP_VAR="SPARSESYNC_${UPPER}_SNAPSHOT"
DIR_VAR="SPARSESYNC_${UPPER}_SNAPSHOT_DIR"
PROJECT=$CHECKOUT
if [[ "${!SNAP_VAR:-$SNAPSHOT_DEFAULT}" == 1 ]]; then
  PROJECT=${!DIR_VAR:-${TMPDIR:-/tmp}/sparsesync-$ENGINE-snapshot}
  mkdir -p "$PROJECT"
  # copy sources only (no .git, no build outputs)
  (cd "$CHECKOUT" && tar --exclude=.git --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude='sparsesync/*.so' -cf - .) | (cd "$PROJECT" && tar -xf -)
  echo "real_test.sh: snapshot of $CHECKOUT in $PROJECT" >&2
fi
PY=$("$SCRIPTS/$ENGINE/make_venv.sh" "$PROJECT" | tail -n1)
T1=$SECONDS
echo "real_test.sh: $ENGINE venv ready in $((T1 - T0)) s ($PY)" >&2
cd "$PROJECT"
rc=0
"$PY" -m pytest -q -p no:cacheprovider -s "tests/${ENGINE}_real" "$@" || rc=$?
echo "real_test.sh: pytest tests/${ENGINE}_real exit $rc in $((SECONDS - T1)) s; total $((SECONDS - T0)) s" >&2
exit $rc
