"""Marker of the real-verl tests (run them with scripts/verl/run_real_test.sh, or ``-m verl`` in the verl venv)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "verl: needs a real verl (the venv of scripts/verl/make_venv.sh)")
