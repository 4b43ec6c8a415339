"""The command line: ordinary mistakes end with one line on stderr (no traceback unless --debug), help texts, the
push summary, progress display, the scratch defaults of the benchmarks, and ``python -m sparsesync.config``."""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparsesync import cli
from sparsesync.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cli-test-token-0123"


def _env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SPARSESYNC_")}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(extra)
    return e


def run_cli(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsesync.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(**({"SPARSESYNC_TOKEN": TOKEN} if env is None else env)), timeout=timeout,
                          cwd=str(ROOT))


def one_error_line(p: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """Exit status ``code``, exactly one line on stderr, no traceback, and the line names every needle."""
    lines = p.stderr.splitlines()
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Safetensors files of the default synthetic model (what `serve` holds without --safetensors) and of a smaller
    one (another layout)."""
    from sparsesync.safetensors_io import save
    d = tmp_path_factory.mktemp("weights")
    save(cli._model_state(2, 256, 0, 4096)[1], d / "w0.safetensors")
    save(cli._model_state(1, 128, 0, 4096)[1], d / "small.safetensors")
    return d


# ---------------------------------------------------------------------------------------------------------------------
# ordinary mistakes: one line, non-zero exit, no traceback

def test_missing_file_one_line_and_debug_traceback(tmp_path):
    missing = tmp_path / "nope" / "w.safetensors"
    one_error_line(run_cli("serve", "--safetensors", missing), str(missing), "No such file")
    p = run_cli("--debug", "serve", "--safetensors", missing)
    assert p.returncode != 0 and "Traceback" in p.stderr and "FileNotFoundError" in p.stderr
    p = run_cli("serve", "--debug", "--safetensors", missing)       # --debug after the subcommand works too
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_not_a_safetensors_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("these are not weights, just a few words of text\n")
    one_error_line(run_cli("push", "--to", "tcp://127.0.0.1:9", "--version", "1", "--safetensors", f), str(f),
                   "not a safetensors file")


@pytest.mark.parametrize("how", ["default", "token-env", "token-file"])
def test_short_token_names_its_source(tmp_path, how):
    args, env = ["serve", "--listen", "tcp://127.0.0.1:0"], _env()
    if how == "default":
        env["SPARSESYNC_TOKEN"], where = "short", "$SPARSESYNC_TOKEN"
    elif how == "token-env":
        env["MY_SECRET"], where = "short", "$MY_SECRET"
        args += ["--token-env", "MY_SECRET"]
    else:
        f = tmp_path / "token"
        f.write_text("short\n")
        args += ["--token-file", f]
        where = str(f)
    one_error_line(run_cli(*args, env=env), where, "at least 8")


def test_missing_token(tmp_path):
    one_error_line(run_cli("push", "--to", "tcp://127.0.0.1:9", "--version", "1", env=_env()), "$SPARSESYNC_TOKEN",
                   "--token-file")
    one_error_line(run_cli("serve", "--token-env", "NOT_SET_ANYWHERE", env=_env()), "$NOT_SET_ANYWHERE")
    missing = tmp_path / "no-token-here"
    one_error_line(run_cli("serve", "--token-file", missing, env=_env()), str(missing))


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        one_error_line(run_cli("serve", "--listen", f"tcp://127.0.0.1:{port}"), f"127.0.0.1:{port}", "in use")


def test_push_failure_prints_stats_and_one_error_line():
    addr = f"tcp://127.0.0.1:{free_port()}"          # nothing listens there
    t0 = time.monotonic()
    p = run_cli("push", "--to", addr, "--version", "1", "--timeout", "2")
    assert time.monotonic() - t0 < 20
    one_error_line(p, addr, "push")
    assert addr in p.stdout and "FAILED" in p.stdout       # the per-peer summary comes first, on stdout


def test_layout_mismatch(weights):
    p = run_cli("push", "--to", f"tcp://127.0.0.1:{free_port()}", "--version", "1", "--timeout", "1",
                "--base", weights / "small.safetensors", "--safetensors", weights / "w0.safetensors")
    one_error_line(p, "layout")


def test_version_conflict(weights):
    """--version must be newer than --base-version: refused before anything is sent."""
    p = run_cli("push", "--to", f"tcp://127.0.0.1:{free_port()}", "--version", "3", "--timeout", "1",
                "--base", weights / "w0.safetensors", "--base-version", "5",
                "--safetensors", weights / "w0.safetensors")
    one_error_line(p, "3", "5")


def test_usage_errors_exit_2():
    p = run_cli("push", "--to", "tcp://127.0.0.1:9", "--version", "1", "--base-version", "2")
    one_error_line(p, "--base-version", code=2)
    p = run_cli("push", "--to", "tcp://127.0.0.1:9", "--version", "1", "--quorum", "2")
    one_error_line(p, "--quorum", code=2)


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    ready = tmp_path / "addr"
    proc = subprocess.Popen([sys.executable, "-m", "sparsesync.cli", "serve", "--listen", "tcp://127.0.0.1:0",
                             "--ready-file", str(ready)], env=_env(SPARSESYNC_TOKEN=TOKEN), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "interrupted", code=130)


# ---------------------------------------------------------------------------------------------------------------------
# push summary: what each peer got, warnings for full updates

def test_push_reports_full_update_of_a_peer_at_another_version(tmp_path, weights):
    procs, addrs = [], []
    try:
        for i, version in enumerate((0, 3)):          # the second receiver is not at the base version
            ready = tmp_path / f"addr{i}"
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "sparsesync.cli", "serve", "--listen", "tcp://127.0.0.1:0", "--ready-file",
                 str(ready), "--version", str(version), "--exit-at", "4"], env=_env(SPARSESYNC_TOKEN=TOKEN),
                cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ready))
        deadline = time.monotonic() + 60
        for proc, ready in procs:
            while not ready.exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            addrs.append(ready.read_text())
        from sparsesync.safetensors_io import load, save
        import torch
        new = load(weights / "w0.safetensors")
        k = next(iter(new))
        new[k].view(torch.int16).view(-1)[:1000] += 1
        save(new, tmp_path / "w4.safetensors")
        p = run_cli("push", "--to", addrs[0], "--to", addrs[1], "--version", "4", "--timeout", "30",
                    "--base", weights / "w0.safetensors", "--safetensors", tmp_path / "w4.safetensors")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "assuming the receivers hold --base as version 0" in p.stdout
        lines = {a: next(ln for ln in p.stdout.splitlines() if a in ln) for a in addrs}
        assert " delta " in lines[addrs[0]] and " full " in lines[addrs[1]], p.stdout
        warn = [ln for ln in p.stderr.splitlines() if "FULL" in ln]
        assert len(warn) == 1 and addrs[1] in warn[0] and "version 3" in warn[0], p.stderr
        assert "Traceback" not in p.stderr
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs:
            proc.communicate(timeout=20)


def _peer(peer, kind, nbytes, version=7, previous=0, ok=True, error=None, note=None):
    return SimpleNamespace(peer=peer, ok=ok, version=version, kind=kind, bytes=nbytes, wire_s=0.01, apply_s=0.002,
                           attempts=1, digest_verified=ok, error=error, previous_version=previous, note=note)


def test_report_push_never_shows_the_delta_size_as_what_a_full_peer_got(capsys):
    st = SimpleNamespace(version=7, encode_s=0.01, total_s=0.2, changed=12345, wire_bytes=76_000, dense_bytes=6_300_000,
                         kind="delta", peers=[_peer("tcp://a:7000", "delta", 76_000),
                                              _peer("tcp://b:7000", "full", 6_300_000, previous=3,
                                                    note="it holds version 3, not the base version 0")])
    cli._report_push(st, 0)
    out, err = capsys.readouterr()
    head = out.splitlines()[0]
    assert "76.0 KB" not in head and "6.4 MB sent in all" in head
    assert "tcp://b:7000" in err and "FULL update (6.3 MB; the delta was 76.0 KB)" in err and "version 3" in err
    assert len(err.splitlines()) == 1


def test_report_push_rollback_and_nothing_changed(capsys):
    st = SimpleNamespace(version=2, encode_s=0.0, total_s=0.1, changed=0, wire_bytes=300, dense_bytes=6_300_000,
                         kind="delta", peers=[_peer("tcp://a:7000", "full", 6_300_000, version=2, previous=5)])
    cli._report_push(st, 1)
    out, err = capsys.readouterr()
    assert "nothing changed" in out and "inf" not in out and "0.0x" not in out
    assert "moved BACK from version 5 to version 2" in err and len(err.splitlines()) == 1


def test_format_helpers_never_print_inf_or_zero_ratios():
    assert cli.format_ratio(5, 0) == "-" and cli.format_ratio(0, 5) == "-" and cli.format_ratio(None, 1) == "-"
    assert cli.format_ratio(1, 1e6) != "0x" and "0.0" not in cli.format_ratio(1, 1e6, ".1f")
    assert cli.format_ratio(2500, 10) == "250x" and cli.format_ratio(208.14, 1, ".1f") == "208.1x"
    assert cli.format_bytes(76_000) == "76.0 KB" and cli.format_bytes(12) == "12 B" and cli.format_bytes(None) == "-"


# ---------------------------------------------------------------------------------------------------------------------
# help texts

def _subparsers(ap: argparse.ArgumentParser) -> dict:
    act = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(act.choices)


def test_every_option_has_help_and_token_rules_are_in_serve_and_push_help():
    subs = _subparsers(cli.build_parser())
    assert set(subs) == {"demo", "serve", "push", "status", "info", "bench"}
    for name, sp in subs.items():
        for a in sp._actions:
            assert a.help, f"{name} {a.option_strings or a.dest} has no help text"
    for name in ("serve", "push"):
        text = subs[name].format_help()
        for needle in ("$SPARSESYNC_TOKEN", "--token-env NAME", "--token-file PATH", "at least 8 characters",
                       "--debug"):
            assert needle in text, (name, needle)
    assert "--quorum" in subs["push"].format_help() and "--allow-rollback" in subs["serve"].format_help()


def test_bench_writes_to_scratch_by_default():
    from sparsesync.netbench import SCRATCH
    args = cli.build_parser().parse_args(["bench"])
    assert Path(args.out) == SCRATCH and "bench/results" not in args.out


# ---------------------------------------------------------------------------------------------------------------------
# python -m sparsesync.config, py.typed

def test_config_module_runs_without_warnings():
    p = subprocess.run([sys.executable, "-W", "error", "-m", "sparsesync.config"], capture_output=True, text=True,
                       env=_env(), cwd=str(ROOT), timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "| `SPARSESYNC_THREADS` |" in p.stdout


def test_py_typed_marker():
    import sparsesync
    assert (Path(sparsesync.__file__).parent / "py.typed").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Progress

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def records():
    logger = logging.getLogger("sparsesync.progress.test")
    got: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())
    h = H()
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, got
    logger.removeHandler(h)


def test_progress_log_lines_after_delay_then_every_interval(records):
    logger, got = records
    clock = FakeClock()
    p = Progress("push v7", 3, stream=io.StringIO(), interval=5.0, delay=3.0, clock=clock, logger=logger)
    assert p.mode == "log"
    for t in (0.5, 1.0, 2.9):
        clock.t = t
        p.add(1 << 20)
    assert got == []
    clock.t = 3.5
    p.add(1 << 20, done=1)
    assert len(got) == 1 and got[0].startswith("push v7: 4.0 MiB sent, 1/3 peers done")
    clock.t = 6.0
    p.add(0)
    p.poll()
    assert len(got) == 1                     # less than `interval` since the last line
    clock.t = 8.6
    p.poll()                                 # also while nothing moves (a stalled peer)
    assert len(got) == 2
    clock.t = 9.0
    p.close()
    assert len(got) == 3 and "finished after 9.0 s" in got[-1] and "1/3 peers done" in got[-1]
    p.close()
    assert len(got) == 3


def test_progress_short_operation_prints_nothing(records):
    logger, got = records
    clock = FakeClock()
    stream = io.StringIO()
    p = Progress("push v1", 2, stream=stream, clock=clock, logger=logger)
    clock.t = 1.0
    p.add(1000, done=2)
    p.close()
    assert got == [] and stream.getvalue() == ""


def test_progress_ticker_logs_while_stalled(records):
    logger, got = records
    p = Progress("push v2", 1, stream=io.StringIO(), interval=0.05, delay=0.05, logger=logger)
    time.sleep(0.4)
    p.close()
    assert len(got) >= 3 and "finished" in got[-1]


def test_progress_tty_redraws_one_line(records):
    logger, got = records
    clock = FakeClock()
    tty = TTY()
    p = Progress("push v7", 3, stream=tty, clock=clock, logger=logger)
    assert p.mode == "tty"
    p.add(int(12.3 * 2**20))
    clock.t = 0.05
    p.add(0, done=1)
    p.close()
    text = tty.getvalue()
    assert text.startswith("\rpush v7:      12.3 MiB sent, 0/3 peers done")
    assert "\rpush v7:      12.3 MiB sent, 1/3 peers done" in text and text.endswith("\n") and text.count("\n") == 1
    assert got == []


def test_progress_disabled_and_thread_safe(records):
    logger, got = records
    stream = TTY()
    p = Progress("push v1", 1, enabled=False, stream=stream, logger=logger)
    p.add(100, done=1)
    p.close()
    assert stream.getvalue() == "" and got == [] and p._ticker is None
    q = Progress("push v1", 8, stream=io.StringIO(), delay=3600, logger=logger)

    def work():
        for _ in range(1000):
            q.add(3)
        q.add(done=1)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.close()
    assert q.sent == 8 * 1000 * 3 and q.done == 8 and got == []


def test_push_logging_shows_progress_but_not_duplicate_library_warnings():
    names = ("sparsesync", "sparsesync.progress")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        cli._configure_logging(SimpleNamespace(cmd="push", verbose=False))
        assert logging.getLogger("sparsesync.progress").isEnabledFor(logging.INFO)
        assert not logging.getLogger("sparsesync").isEnabledFor(logging.WARNING)
        logging.getLogger("sparsesync").setLevel(logging.NOTSET)
        cli._configure_logging(SimpleNamespace(cmd="push", verbose=True))
        assert logging.getLogger("sparsesync").isEnabledFor(logging.INFO)
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


# ---------------------------------------------------------------------------------------------------------------------
# benchmark output: "-" instead of inf / 0.0x, files in --out DIR

def test_netbench_report_without_baselines(tmp_path, capsys):
    from sparsesync import netbench
    rows = [{"method": "sparsesync", "seconds": 0.4, "link_bytes": 1000, "exact": True, "rate": "1gbit",
             "rate_bits": 1e9, "phase_encode_s": 0.1, "phase_wire_s": 0.2, "phase_apply_s": 0.1,
             "pipelining_ratio": 2.0}]
    netbench.report(rows, SimpleNamespace(params=1e6, density=0.5, out=str(tmp_path / "net")))
    out = capsys.readouterr().out
    assert "0.0x" not in out and "inf" not in out and "| - | - |" in out
    assert (tmp_path / "net" / "net.json").is_file() and (tmp_path / "net" / "net.txt").read_text() in out


def test_codec_bench_rows_when_nothing_changed(capsys):
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("bench_codec", ROOT / "bench" / "codec.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = {"w": torch.randn(4096).to(torch.bfloat16)}
    row = mod.size_row("unchanged", base, {"w": base["w"].clone()}, dense_zstd=True)
    mod.print_table([row], mod.SIZE_COLS)
    out = capsys.readouterr().out
    assert "inf" not in out and "nan" not in out and "| unchanged |" in out and "| - |" in out


def test_status_reports_version_and_digest_and_checks_expect():
    import json

    import torch

    import sparsesync as ss
    state = {"w": torch.arange(10, dtype=torch.float32)}
    r = ss.Receiver(state, "tcp://127.0.0.1:0", token=TOKEN, version=4, status=lambda: {"applied_version": 3}).start()
    try:
        p = run_cli("status", r.address)
        assert p.returncode == 0, p.stderr
        assert f"version 4  digest {ss.state_digest(state)}" in p.stdout and "applied_version=3" in p.stdout
        p = run_cli("status", r.address, "--json")
        assert json.loads(p.stdout)["status"] == {"applied_version": 3}
        assert run_cli("status", r.address, "--expect", "5").returncode == 1
        p = run_cli("status", r.address, f"tcp://127.0.0.1:{free_port()}", "--timeout", "2")
        assert p.returncode == 1 and "unreachable" in p.stdout
        one_error_line(run_cli("status", r.address, env={}), "SPARSESYNC_TOKEN")
    finally:
        r.stop()


def test_info_says_what_this_installation_can_do():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    for line in ("native library:", "CPU kernels:", "CUDA sources compiled:", "CUDA kernels usable:",
                 "NCCL backend usable:"):
        assert line in r.stdout
    r = run_cli("info", "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and set(info) >= {"version", "native", "cuda", "cuda_usable", "nccl"}
    r = run_cli("info", "--require-cuda")
    assert r.returncode == (0 if info["cuda_usable"] else 1)
