"""Marker of the real-vLLM tests (run them with scripts/vllm/run_real_test.sh, or ``-m vllm`` in the vLLM venv)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs a real vLLM (the venv of scripts/vllm/make_venv.sh)")
