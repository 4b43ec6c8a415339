#!/usr/bin/env bash
# Runs the real-verl test of the sparsesync checkpoint-engine backend (tests/verl_real/) in the verl venv
# (torch 2.13.0 CPU + verl 0.9.1 without GPU extras; see make_venv.sh for SPARSESYNC_VERL_VENV, _PYTHON, _PIP_ARGS,
# _REBUILD). Runs on a copy of the checkout unless SPARSESYNC_VERL_SNAPSHOT=0 (see scripts/real_test.sh).
#
# Usage: scripts/verl/run_real_test.sh [PYTEST ARGS...]         e.g.  -k missing   or   -x
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/real_test.sh" verl "$@"
