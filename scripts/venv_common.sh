# Shared steps of scripts/vllm/make_venv.sh and scripts/verl/make_venv.sh (sourced, not run). The caller sets VENV,
# PY (= $VENV/bin/python), BASE_PY, PROJECT and STEP, and defines die().

# One builder at a time (parallel CI jobs sharing a cache); the lock file lives beside the venv.
venv_lock() {
  mkdir -p "$(dirname "$VENV")" || die "cannot create $(dirname "$VENV")"
  if command -v flock >/dev/null; then
    exec 9>"$VENV.lock" || die "cannot open lock file $VENV.lock"
    flock 9 || die "cannot lock $VENV.lock"
  fi
}

# Delete the old venv (only ever something that is a venv, or an empty dir) and create a new one.
venv_create() {
  STEP="remove old venv"
  if [[ -e "$VENV" ]]; then
    if [[ -f "$VENV/pyvenv.cfg" ]] || [[ -d "$VENV" && -z "$(ls -A "$VENV")" ]]; then
      echo "make_venv.sh: rebuilding $VENV (stamp missing, different or incomplete)" >&2
      rm -rf "$VENV"
    else
      die "$VENV exists and is not a virtual environment; refusing to delete it"
    fi
  fi
  STEP="create venv"
  "$BASE_PY" -m venv "$VENV" || die "python -m venv $VENV failed"
}

# Install PROJECT editable with --no-deps, plus its other requirements (and the `test` extra) with torch pinned to
# the version in the venv. Redone when sparsesync resolves elsewhere, when the installed metadata lacks an entry
# point that pyproject.toml declares (entry points are written at install time), or when the native library's
# sources changed since the last install (their hash is kept in $VENV/.sparsesync-project-stamp).
project_install() {
  STEP="pip install -e $PROJECT --no-deps"
  local pstamp="$VENV/.sparsesync-project-stamp" want
  want="$PROJECT $(cd "$PROJECT" && { find csrc -type f -print0 2>/dev/null | sort -z | xargs -0 sha256sum; \
    sha256sum CMakeLists.txt setup.py pyproject.toml; } | sha256sum | cut -d' ' -f1)"
  if [[ -f "$pstamp" && "$(cat "$pstamp")" == "$want" ]] && (cd / && "$PY" - "$PROJECT" <<'PYEOF' >/dev/null 2>&1
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
PYEOF
  ); then
    return 0
  fi
  echo "make_venv.sh: pip install -e $PROJECT --no-deps" >&2
  rm -f "$pstamp"
  "$PY" -m pip install --no-input --no-deps -e "$PROJECT" >&2 || die "pip install -e $PROJECT --no-deps failed"
  STEP="install the project's requirements except torch"
  local reqs
  mapfile -t reqs < <("$PY" - "$PROJECT/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
proj = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(proj.get("dependencies", [])) + list(proj.get("optional-dependencies", {}).get("test", []))
for r in reqs:
    if re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() != "torch":
        print(r)
PYEOF
  ) || die "cannot read the requirements from $PROJECT/pyproject.toml"
  local pin="$VENV/.torch-pin.txt"
  "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$pin"
  if ((${#reqs[@]})); then
    "$PY" -m pip install --no-input -c "$pin" "${reqs[@]}" >&2 || die "pip install ${reqs[*]} failed"
  fi
  (cd / && "$PY" -c "import sparsesync, sparsesync.kernels as k; assert k.using_native(), 'native library not loaded'") \
    || die "import sparsesync (native) fails in $VENV after the editable install"
  echo "$want" >"$pstamp"
}
