#!/usr/bin/env bash
# Creates (or reuses) the virtual environment for the real-verl tests of sparsesync (tests/verl_real/):
#   torch==2.13.0 (the CPU build; pinned in the same pip command so pip never pulls a CUDA torch), verl==0.9.1
#   without GPU extras (its base requirements: ray, transformers, tensordict, hydra, ...) plus uvicorn and fastapi
#   (imported by verl.checkpoint_engine but only listed in verl's verl-core extra), and sparsesync
#   installed editable with --no-deps from PROJECT_DIR (normally a snapshot copy made by run_real_test.sh).
#
# Usage: scripts/verl/make_venv.sh [PROJECT_DIR]        (default: the checkout this script lives in)
# Prints the venv's python path as the last line of stdout, so callers can do PY=$(make_venv.sh | tail -n1).
#
# Environment:
#   SPARSESYNC_VERL_VENV     venv location (default $HOME/.cache/sparsesync/verl-venv)
#   SPARSESYNC_VERL_PYTHON   interpreter that creates the venv (default python3; 3.10..3.13)
#   SPARSESYNC_VERL_REBUILD  1: delete and rebuild the venv even if its stamp matches
#   SPARSESYNC_VERL_PIP_ARGS extra pip arguments for the torch/verl install, e.g.
#                            "--extra-index-url https://download.pytorch.org/whl/cpu" where torch==2.13.0+cpu is
#                            not reachable otherwise (PyPI itself only has the CUDA build of torch 2.13.0).
#
# Reuse rule: the venv is reused when $VENV/.sparsesync-verl-stamp exists and its content equals the pins below
# (the stamp is written last, only after every step succeeded) and torch / verl report the pinned versions.
# The editable install of the project is redone when sparsesync in the venv does not resolve to PROJECT_DIR or
# when the native sources (csrc/, CMakeLists.txt, setup.py) differ from those of the last install (their hash is
# kept in $VENV/.sparsesync-project-stamp), so the native library is rebuilt when its sources change.
set -Eeuo pipefail

TORCH_VERSION=2.13.0
VERL_VERSION=0.9.1
# verl 0.9.1's verl.checkpoint_engine.base imports verl.workers.rollout.utils, which imports uvicorn (and fastapi);
# both are only in verl's "verl-core" extra, which also pulls torchcodec, nvtx, TransferQueue, ... (not needed here)
EXTRA_PKGS=(uvicorn fastapi)

T0=$SECONDS
STEP="start"
die() { echo "make_venv.sh: FAILED: $*" >&2; exit 1; }
trap 'rc=$?; echo "make_venv.sh: FAILED in step \"$STEP\" (exit $rc) after $((SECONDS - T0)) s" >&2; exit $rc' ERR

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=${1:-$(cd "$SCRIPT_DIR/../.." && pwd)}
[[ -f "$PROJECT/pyproject.toml" && -d "$PROJECT/sparsesync" ]] || die "not a sparsesync checkout: $PROJECT"
PROJECT=$(cd "$PROJECT" && pwd -P)
VENV=${SPARSESYNC_VERL_VENV:-$HOME/.cache/sparsesync/verl-venv}
BASE_PY=${SPARSESYNC_VERL_PYTHON:-python3}
read -r -a EXTRA_PIP <<<"${SPARSESYNC_VERL_PIP_ARGS:-}"
STAMP="$VENV/.sparsesync-verl-stamp"
PSTAMP="$VENV/.sparsesync-project-stamp"
PY="$VENV/bin/python"

command -v "$BASE_PY" >/dev/null || die "interpreter '$BASE_PY' not found (set SPARSESYNC_VERL_PYTHON)"
PYVER=$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "'$BASE_PY' does not run"
"$BASE_PY" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 13) else 1)' \
  || die "verl $VERL_VERSION with torch $TORCH_VERSION needs Python 3.10..3.13, '$BASE_PY' is $PYVER (set SPARSESYNC_VERL_PYTHON)"
WANT_STAMP="torch==$TORCH_VERSION verl==$VERL_VERSION extra=${EXTRA_PKGS[*]} python=$PYVER complete"

source "$SCRIPT_DIR/../venv_common.sh"
venv_lock

base_ok() {  # the venv holds the pinned packages and was completed by this script
  [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] || return 1
  [[ "${SPARSESYNC_VERL_REBUILD:-0}" != 1 ]] || return 1
  "$PY" - "$TORCH_VERSION" "$VERL_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
torch_v, verl_v = sys.argv[1:]
assert version("torch").split("+")[0] == torch_v
assert version("verl") == verl_v
PYEOF
}

if base_ok; then
  echo "make_venv.sh: reusing $VENV ($WANT_STAMP)" >&2
else
  venv_create
  STEP="pip install torch==$TORCH_VERSION verl==$VERL_VERSION ${EXTRA_PKGS[*]}"
  echo "make_venv.sh: pip install torch==$TORCH_VERSION verl==$VERL_VERSION ${EXTRA_PKGS[*]} into $VENV" >&2
  # torch is pinned in the same command: verl's requirements (torchdata, peft, accelerate, ...) would otherwise
  # let pip choose a torch, and PyPI's torch 2.13.0 for x86_64 is the CUDA build.
  "$PY" -m pip install --no-input "${EXTRA_PIP[@]}" "torch==$TORCH_VERSION" "verl==$VERL_VERSION" "${EXTRA_PKGS[@]}" >&2 \
    || die "pip install torch==$TORCH_VERSION verl==$VERL_VERSION failed (pass SPARSESYNC_VERL_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu' if pip cannot find torch==$TORCH_VERSION+cpu)"
  STEP="check the torch build"
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda is None else "torch " + torch.__version__ + " is a CUDA build")' \
    || die "a CUDA torch was installed into $VENV; install torch==$TORCH_VERSION+cpu (see SPARSESYNC_VERL_PIP_ARGS)"
  STEP="check imports"
  "$PY" -c "import torch, verl, verl.checkpoint_engine, ray; print('make_venv.sh: torch', torch.__version__, 'verl', verl.__version__, 'ray', ray.__version__)" >&2 \
    || die "import torch / verl.checkpoint_engine / ray fails in $VENV"
  echo "$WANT_STAMP" >"$STAMP"
  rm -f "$PSTAMP"
fi

project_install

echo "make_venv.sh: ready in $((SECONDS - T0)) s: $VENV (project $PROJECT)" >&2
echo "$PY"
