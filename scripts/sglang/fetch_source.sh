#!/usr/bin/env bash
# Downloads the released SGLang 0.5.23 wheel (no dependencies, nothing installed) and unpacks its Python sources into
# ~/.cache/sparsesync/sglang-0.5.23 (SPARSESYNC_SGLANG_SRC), where tests/test_sglang_client.py reads the exact
# signatures, routes and pickling allow-list of that release. Reuses the unpacked copy when it is there.
# Prints the directory. Exit 0 also when the download fails (the signature tests then skip and say why).
set -uo pipefail
DEST=${SPARSESYNC_SGLANG_SRC:-$HOME/.cache/sparsesync/sglang-0.5.23}
if [[ -f "$DEST/sglang/version.py" ]]; then
  echo "$DEST"; exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if pip download --no-deps --only-binary=:all: --python-version 3.11 -q -d "$TMP" "sglang==0.5.23" >&2; then
  mkdir -p "$DEST.part" && python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$(ls "$TMP"/sglang-0.5.23-*.whl | head -n1)" "$DEST.part" && rm -rf "$DEST" && mv "$DEST.part" "$DEST"
else
  echo "fetch_source.sh: could not download sglang==0.5.23; the SGLang signature tests will skip" >&2
fi
echo "$DEST"
