"""Soak test on loopback: many versions pushed to receiver processes that are killed, cut off and stalled.

    python bench/soak.py [--versions 1000] [--receivers 3] [--kill-every 50] [--out DIR]

One trainer (this process) holds a small Llama-like bf16 model (``sparsesync.cli._model_state``), changes about
0.6% of its elements per version by +-1 ulp (like an RL step), and pushes every version with one ``Sender`` to N
receivers. Each receiver is a separate process (this script with ``--worker``) that starts from the same initial
weights at version 0, and prints ``version digest`` for every update it applies (its own ``state_digest``, computed
in ``on_update``). The trainer checks each reported digest against the digest of the version it pushed.

Faults, all on loopback:

- kills: every ``--kill-every`` versions one receiver (in turn) is SIGKILLed at a random moment during a push and
  restarted on the same port from its initial checkpoint (version 0); the sender has to catch it up.
- cuts: a fault-injecting TCP proxy sits between the sender and each receiver. Per version and receiver, with
  probability ``--cut-rate``, it arms a cut at a random byte offset (log-uniform) in the sender->receiver or the
  receiver->sender stream; a new connection is armed with probability ``--handshake-cut-rate`` at an offset inside
  the handshake. A cut closes the connection (FIN), resets it (RST), or half-closes one direction.
- stalls: with probability ``--stall-rate`` the proxy pauses a stream for 0.1-1.5 s; with ``--long-stall-rate`` it
  pauses past the sender's timeout.

After the last version the faults stop, every receiver is brought back, one more version is pushed, and every
receiver must reach it with the trainer's digest. The exit status is non-zero on any digest mismatch, a final state
that does not match, a push that ran far past its timeout, or a run that did not finish within ``--max-seconds``.

Writes DIR/soak.txt (the table printed at the end) and DIR/soak.json. DIR defaults to a new temporary folder.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))            # an installed (or PYTHONPATH) sparsesync comes first

TOKEN_ENV = "SPARSESYNC_SOAK_TOKEN"
LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------------------------------------------------
# receiver worker (a separate process)

def _maxrss_kib() -> int:
    """Peak resident set size of this process in KiB: VmHWM, which starts afresh at exec (getrusage's ru_maxrss
    does not: a child process reports at least its parent's peak at the time of the fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # KiB on Linux


def worker_main(args) -> int:
    """Receiver process: listen on loopback, print ``R port version digest rss`` once ready, ``U version digest rss``
    for every applied update (``S version`` when it moved on while the digest was computed), exit on stdin EOF."""
    import sparsesync as ss
    from sparsesync.cli import _model_state
    from sparsesync.session import Receiver

    _, state = _model_state(args.layers, args.hidden, args.seed, args.vocab)
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    box = {}

    def on_update(version, stats):
        r = box["r"]
        v1, n1 = r.version, r.updates_applied
        d = ss.state_digest(r.state)
        v2, n2 = r.version, r.updates_applied
        if v1 == v2 == version and n1 == n2:
            say(f"U {version} {d} {_maxrss_kib()}")
        else:                    # another connection committed meanwhile: that digest would name no single version
            say(f"S {version} {v1} {v2}")

    r = Receiver(state, listen=f"tcp://{LOOPBACK}:{args.port}", token=os.environ[TOKEN_ENV], version=0,
                 on_update=on_update)
    box["r"] = r
    r.start()
    say(f"R {r.port} {r.version} {ss.state_digest(r.state)} {_maxrss_kib()}")
    try:
        while sys.stdin.buffer.read(1):         # the trainer never writes: EOF means it ended (or died)
            pass
    except KeyboardInterrupt:
        pass
    finally:
        r.stop(2.0)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# fault-injecting TCP proxy

@dataclass
class Fault:
    kind: str                 # fin | rst | half | stall
    direction: str            # s2r | r2s
    offset: int               # bytes of that direction still to pass before the fault
    seconds: float = 0.0      # stall length
    handshake: bool = False
    long: bool = False


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self._lock = threading.Lock()
        self.closed = False

    def close(self, rst: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.client, self.upstream):
            try:
                if rst:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.shutdown(socket.SHUT_RD)          # wakes the other pipe thread without sending a FIN
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass


class FaultProxy:
    """Listens on a loopback port and forwards each connection to ``target_port``. Faults are armed from outside
    (``arm``) and fire when their byte offset passes in their direction, on whichever connection carries it."""

    def __init__(self, target_port: int, rng: random.Random, handshake_cut_rate: float = 0.0):
        self.target_port = target_port
        self.rng = rng
        self.handshake_cut_rate = handshake_cut_rate
        self.enabled = True
        self.partitioned = False
        self.srv = socket.create_server((LOOPBACK, 0))
        self.srv.settimeout(0.2)
        self.port = self.srv.getsockname()[1]
        self.counts: collections.Counter = collections.Counter()
        self.events: list = []
        self._pending: dict[str, Fault | None] = {"s2r": None, "r2s": None}
        self._lock = threading.Lock()
        self._conns: set = set()
        self._stop = False
        self._t = threading.Thread(target=self._loop, name=f"soak-proxy-{self.port}", daemon=True)
        self._t.start()

    @property
    def address(self) -> str:
        return f"tcp://{LOOPBACK}:{self.port}"

    def arm(self, fault: Fault) -> bool:
        with self._lock:
            if not self.enabled or self._pending[fault.direction] is not None:
                return False
            self._pending[fault.direction] = fault
            return True

    def disarm(self) -> None:
        with self._lock:
            self.enabled = False
            self.partitioned = False
            self._pending = {"s2r": None, "r2s": None}

    def partition(self) -> None:
        """Cut every connection and refuse new ones until ``heal``: the receiver keeps its state but misses
        versions (a network partition)."""
        with self._lock:
            if not self.enabled or self.partitioned:
                return
            self.partitioned = True
        self.counts["partitions"] += 1
        for c in list(self._conns):
            c.close()

    def heal(self) -> None:
        self.partitioned = False

    def close(self) -> None:
        self._stop = True
        self.disarm()
        self._t.join(2.0)
        self.srv.close()
        for c in list(self._conns):
            c.close()

    def _loop(self) -> None:
        while not self._stop:
            try:
                client, _ = self.srv.accept()
            except (TimeoutError, OSError):
                continue
            self.counts["connections"] += 1
            if self.partitioned:
                self.counts["partition_refused"] += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=2.0)
                upstream.settimeout(None)
            except OSError:
                self.counts["upstream_refused"] += 1          # the receiver is down (killed, restarting)
                client.close()
                continue
            client.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, upstream)
            self._conns.add(conn)
            if self.enabled and self.rng.random() < self.handshake_cut_rate:
                d = "s2r" if self.rng.random() < 0.6 else "r2s"
                # CHALLENGE ~60 B and WELCOME ~150 B go r2s, AUTH ~80 B s2r: cut somewhere inside them
                self.arm(Fault(self.rng.choice(["fin", "fin", "rst"]), d, self.rng.randint(0, 120 if d == "s2r"
                                                                                          else 220), handshake=True))
            threading.Thread(target=self._pipe, args=(conn, client, upstream, "s2r"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(conn, upstream, client, "r2s"), daemon=True).start()

    def _take(self, direction: str, n: int):
        """The fault that fires within the next ``n`` bytes of ``direction``, and how many bytes pass before it."""
        with self._lock:
            f = self._pending[direction]
            if f is None:
                return None
            if f.offset < n:
                self._pending[direction] = None
                return f.offset, f
            f.offset -= n
            return None

    def _pipe(self, conn: _Conn, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while not conn.closed:
                data = src.recv(65536)
                if not data:
                    break
                while data:
                    hit = self._take(direction, len(data))
                    if hit is None:
                        dst.sendall(data)
                        break
                    n, f = hit
                    if n:
                        dst.sendall(data[:n])
                    data = data[n:]
                    self._record(f)
                    if f.kind == "stall":
                        time.sleep(f.seconds)
                        continue
                    if f.kind == "half":          # this direction ends; the other goes on until its side gives up
                        try:
                            dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        return
                    conn.close(rst=f.kind == "rst")
                    return
        except OSError:
            pass
        conn.close()
        self._conns.discard(conn)

    def _record(self, f: Fault) -> None:
        if f.kind == "stall":
            self.counts["stalls_long" if f.long else "stalls_short"] += 1
        else:
            self.counts["cuts"] += 1
            self.counts[f"cuts_{f.direction}"] += 1
            self.counts[f"cuts_{f.kind}"] += 1
            if f.handshake:
                self.counts["cuts_handshake"] += 1
        self.events.append((time.monotonic(), asdict(f)))


# ---------------------------------------------------------------------------------------------------------------------
# receiver slots (one process at a time per slot, restarted on the same port)

class Slot:
    def __init__(self, index: int, cfg: SoakConfig, scratch: Path, token: str, checker: Checker):
        self.index, self.cfg, self.scratch, self.token, self.checker = index, cfg, scratch, token, checker
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.incarnations = 0
        self.ready = threading.Event()
        self.last_version: int | None = None
        self.last_digest: str | None = None
        self.peak_rss_kib = 0
        self.killed = 0
        self.unexpected_exits: list = []
        self._killing = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self.incarnations += 1
            self.ready.clear()
            self.last_version = None
            inc = self.incarnations
            env = dict(os.environ, **{TOKEN_ENV: self.token})
            import sparsesync  # the receivers import the same sparsesync as this process
            pkg = str(Path(sparsesync.__file__).resolve().parent.parent)
            env["PYTHONPATH"] = pkg + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--port", str(self.port),
                   "--layers", str(self.cfg.layers), "--hidden", str(self.cfg.hidden), "--vocab",
                   str(self.cfg.vocab), "--seed", str(self.cfg.seed)]
            log = open(self.scratch / f"receiver{self.index}.{inc}.log", "wb")
            try:
                self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=log, cwd=str(ROOT))
            finally:
                log.close()
            self._killing = False
            threading.Thread(target=self._read, args=(self.proc, inc), daemon=True).start()

    def _read(self, proc: subprocess.Popen, inc: int) -> None:
        for raw in proc.stdout:
            parts = raw.decode(errors="replace").split()
            if not parts:
                continue
            if parts[0] == "R" and len(parts) == 5:
                if self.port == 0:
                    self.port = int(parts[1])
                self._note_rss(int(parts[4]))
                self.checker.check(self, inc, int(parts[2]), parts[3], initial=True)
                self.ready.set()
            elif parts[0] == "U" and len(parts) == 4:
                self._note_rss(int(parts[3]))
                self.checker.check(self, inc, int(parts[1]), parts[2])
            elif parts[0] == "S":
                self.checker.skipped += 1
        rc = proc.wait()
        if not self._killing and self.proc is proc and not self.checker.stopping:
            self.unexpected_exits.append({"incarnation": inc, "returncode": rc,
                                          "log": str(self.scratch / f"receiver{self.index}.{inc}.log")})

    def _note_rss(self, kib: int) -> None:
        self.peak_rss_kib = max(self.peak_rss_kib, kib)

    def _read_hwm(self) -> None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self._note_rss(int(line.split()[1]))
        except (OSError, ValueError, AttributeError):
            pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        with self._lock:
            if self.proc is None:
                return
            self._killing = True
            self._read_hwm()
            try:
                self.proc.send_signal(signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(30)
            self.ready.clear()
            self.killed += 1

    def stop(self) -> None:
        """End the process (used at the end, and on errors): close its stdin, then kill it if it lingers."""
        with self._lock:
            p = self.proc
            if p is None:
                return
            self._killing = True
            self._read_hwm()
            try:
                p.stdin.close()
            except OSError:
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


class Checker:
    """Every (version, digest) a receiver reports is compared with the digest of the version the trainer pushed."""

    def __init__(self):
        self.digests: dict[int, str] = {}
        self.lock = threading.Lock()
        self.checks = 0
        self.initial_checks = 0
        self.skipped = 0
        self.mismatches: list = []
        self.unknown: list = []
        self.reapplied = 0          # the same version applied again within one incarnation
        self.regressions: list = []
        self.stopping = False
        self._seen: dict = {}

    def check(self, slot: Slot, inc: int, version: int, digest: str, initial: bool = False) -> None:
        with self.lock:
            expected = self.digests.get(version)
            key = (slot.index, inc)
            prev = self._seen.get(key)
            if prev is not None and version == prev:
                self.reapplied += 1
            elif prev is not None and version < prev:
                self.regressions.append({"receiver": slot.index, "incarnation": inc, "from": prev, "to": version})
            self._seen[key] = version if prev is None else max(prev, version)
            if expected is None:
                self.unknown.append({"receiver": slot.index, "incarnation": inc, "version": version,
                                     "digest": digest})
                return
            self.checks += 1
            self.initial_checks += initial
            slot.last_version, slot.last_digest = version, digest
            if digest != expected:
                self.mismatches.append({"receiver": slot.index, "incarnation": inc, "version": version,
                                        "got": digest, "expected": expected, "initial": initial})


# ---------------------------------------------------------------------------------------------------------------------
# the trainer side

@dataclass
class SoakConfig:
    versions: int = 1000
    receivers: int = 3
    kill_every: int = 50
    layers: int = 2
    hidden: int = 256
    vocab: int = 4096
    seed: int = 0
    density: float = 0.006            # fraction of bf16 elements changed per version
    cut_rate: float = 0.05            # per version and receiver: arm a cut
    handshake_cut_rate: float = 0.05  # per new connection: arm a cut inside the handshake
    stall_rate: float = 0.01          # per version and receiver: arm a short stall (0.1-1.5 s)
    long_stall_rate: float = 0.001    # per version and receiver: arm a stall past the sender's timeout
    partition_rate: float = 0.004     # per version and receiver: unreachable for the next 1-6 versions
    kill_delay: float = 0.08          # the kill lands at a random moment within this many seconds of the push start
    timeout: float = 5.0              # Sender(timeout=...): the push window
    retries: int = 3
    backoff: float = 0.05
    max_seconds: float = 3600.0
    progress_every: int = 50
    progress_seconds: float = 10.0
    ready_timeout: float = 120.0
    final_timeout: float = 60.0


def mutate(state: dict, density: float, g) -> None:
    """An RL-like step in place: +-1 ulp at ``density`` of each bf16 tensor's elements (through an int16 view)."""
    import torch
    for t in state.values():
        flat = t.view(torch.int16).view(-1)
        k = max(1, int(flat.numel() * density))
        idx = torch.randint(0, flat.numel(), (k,), generator=g).unique()
        flat[idx] += torch.randint(0, 2, (idx.numel(),), generator=g, dtype=torch.int16) * 2 - 1


def _norm_error(e: str) -> str:
    e = re.sub(r"tcp://[0-9.]+:\d+|[0-9.]+:\d+", "ADDR", e)
    e = re.sub(r"\d+(\.\d+)?", "N", e)
    return e[:160]


def _full_reason(v: int, note: str, retain: int | None) -> str:
    """Why a peer got a full update, from the sender's note ("... it holds version X ...")."""
    m = re.search(r"holds version (\d+)", note)
    if not m:
        return "other: " + _norm_error(note) if note else "unknown"
    held = int(m.group(1))
    if held == v:
        return "it held this version already (ACK lost)"
    if held == 0:
        return "restarted at version 0"
    if retain is not None and 0 < v - held <= retain + 1:     # retained deltas, then this version's delta
        return f"behind by 1-{retain + 1} versions (a chain would do)"
    return f"behind by more than {retain + 1 if retain is not None else '?'} versions"


def _pct(xs: list, q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    i = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[i]


def run_soak(cfg: SoakConfig, log=print) -> dict:
    """Run the soak; returns the results (see ``format_report``). Every child process is ended before it returns."""
    import torch

    import sparsesync as ss
    from sparsesync.cli import _model_state
    from sparsesync.session import Sender
    try:
        from sparsesync.errors import PushFailed
    except ImportError:                       # older session code: a failed push is reported in its stats only
        class PushFailed(Exception):
            stats = None

    t_start = time.monotonic()
    rng = random.Random(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    token = os.urandom(16).hex()
    scratch = Path(tempfile.mkdtemp(prefix="sparsesync-soak-"))
    checker = Checker()
    slots = [Slot(i, cfg, scratch, token, checker) for i in range(cfg.receivers)]
    proxies: list[FaultProxy] = []
    sender = None
    findings: list[str] = []
    res: dict = {"config": asdict(cfg), "scratch": str(scratch)}
    kill_threads: list[threading.Thread] = []
    push_times, push_records = [], []
    counts = collections.Counter()
    kinds_ok, kinds_bytes, kinds_tried = collections.Counter(), collections.Counter(), collections.Counter()
    errors = collections.Counter()
    full_why = collections.Counter()
    error_examples: dict = {}
    hung = aborted = interrupted = False
    nparams = 0
    # the sender's log (a warning per cut connection, per full update...) goes to a file and a count, not the terminal
    slog = logging.getLogger("sparsesync")
    saved_log = (slog.handlers[:], slog.propagate, slog.level)
    handler = _LogCounter(scratch / "sender.log")
    slog.handlers[:] = [handler]
    slog.propagate = False
    slog.setLevel(logging.WARNING)
    thread_errors: list = []
    saved_hook = threading.excepthook

    def hook(a):          # an exception that escapes a thread (sparsesync's or ours) is a finding, never silent
        tb = "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback))
        thread_errors.append({"thread": a.thread.name if a.thread else None,
                              "error": f"{a.exc_type.__name__}: {a.exc_value}", "traceback": tb[-3000:]})
        handler.stream_write(f"uncaught exception in thread {a.thread.name if a.thread else None}:\n{tb}")
    threading.excepthook = hook
    try:
        _, state = _model_state(cfg.layers, cfg.hidden, cfg.seed, cfg.vocab)
        nparams = sum(t.numel() for t in state.values())
        checker.digests[0] = ss.state_digest(state)
        for s in slots:
            s.start()
        for s in slots:
            if not s.ready.wait(cfg.ready_timeout):
                raise RuntimeError(f"receiver {s.index} did not start within {cfg.ready_timeout:.0f} s "
                                   f"(log: {scratch}/receiver{s.index}.1.log)")
            proxies.append(FaultProxy(s.port, random.Random(rng.random()), cfg.handshake_cut_rate))
        log(f"soak: {cfg.versions} versions, {cfg.receivers} receivers (ports "
            f"{', '.join(str(s.port) for s in slots)} behind proxies {', '.join(str(p.port) for p in proxies)}), "
            f"model {nparams / 1e6:.2f}M bf16 params, {100 * cfg.density:.2f}% changed per version, "
            f"kill every {cfg.kill_every}, scratch {scratch}")
        sender = Sender([p.address for p in proxies], token=token, base={k: v.clone() for k, v in state.items()},
                        base_version=0, digest=True, progress=False, timeout=cfg.timeout, retries=cfg.retries,
                        backoff=cfg.backoff)
        watchdog = 3 * cfg.timeout + 30

        def do_push(v: int):
            """One push with a watchdog; returns (stats, raised PushFailed?, seconds) or None if it hung."""
            box = {}

            def run():
                t0 = time.perf_counter()
                try:
                    box["stats"], box["failed"] = sender.push(state, v), False
                except PushFailed as exc:
                    box["stats"], box["failed"] = exc.stats, True
                except BaseException as exc:          # noqa: BLE001 - anything else is reported as it is
                    box["exc"] = exc
                box["s"] = time.perf_counter() - t0
            t = threading.Thread(target=run, name=f"soak-push-{v}", daemon=True)
            t.start()
            t.join(watchdog)
            if t.is_alive():
                return None
            if "exc" in box:
                return box["exc"]
            return box["stats"], box["failed"], box["s"]

        def account(v: int, st, failed: bool, secs: float, final: bool = False) -> None:
            push_times.append(secs)
            peers = list(getattr(st, "peers", []) or [])
            n_ok = sum(1 for p in peers if p.ok and p.version == v)
            if n_ok == len(peers) and peers:
                counts["fully_ok"] += 1
            elif n_ok > 0:
                counts["partially_ok"] += 1
            else:
                counts["failed"] += 1
            if failed:
                counts["push_failed_raised"] += 1
            if secs > cfg.timeout + 6.0:
                counts["overran"] += 1
                findings.append(f"push v{v} took {secs:.1f} s with timeout {cfg.timeout:.1f} s")
            for p in peers:
                kinds_tried[p.kind] += 1
                if p.ok:
                    kinds_ok[p.kind] += 1
                    kinds_bytes[p.kind] += p.bytes
                    if p.kind == "full":
                        full_why[_full_reason(v, getattr(p, "note", None) or "", sender.retain.maxlen)] += 1
                if p.attempts > 1:
                    counts["peer_retries"] += p.attempts - 1
                if p.error:
                    key = _norm_error(p.error)
                    errors[key] += 1
                    error_examples.setdefault(key, f"v{v} {p.peer}: {p.error}")
            if n_ok != len(peers) or any(p.kind != "delta" for p in peers) or final:
                push_records.append({"v": v, "ms": round(secs * 1e3, 1), "ok": n_ok, "final": final,
                                     "kinds": [p.kind for p in peers]})

        def kill_later(slot: Slot, delay: float) -> None:
            time.sleep(delay)
            slot.kill()
            slot.start()

        last_log, v = time.monotonic(), 0
        heal_at: dict[int, int] = {}
        for v in range(1, cfg.versions + 1):
            if time.monotonic() - t_start > cfg.max_seconds:
                findings.append(f"stopped at v{v - 1}: --max-seconds {cfg.max_seconds:.0f} reached")
                v -= 1
                break
            for s in slots:                       # a receiver that died on its own: recorded, then restarted
                if s.proc is not None and not s.alive() and not s._killing:
                    time.sleep(0.2)               # let its reader record the exit
                    s.start()
            for i, p in enumerate(proxies):
                if p.partitioned and v >= heal_at.get(i, 0):
                    p.heal()
                if not p.partitioned and rng.random() < cfg.partition_rate:
                    heal_at[i] = v + rng.randint(1, 6)
                    p.partition()
                if rng.random() < cfg.cut_rate:
                    d = "s2r" if rng.random() < 0.7 else "r2s"
                    hi = 64 << 10 if d == "s2r" else 512          # a delta is ~25 KB, an ACK ~100 B
                    off = int(math.exp(rng.uniform(0, math.log(hi))))
                    p.arm(Fault(rng.choice(["fin", "fin", "rst", "half"]), d, off))
                if rng.random() < cfg.stall_rate:
                    p.arm(Fault("stall", "s2r" if rng.random() < 0.7 else "r2s", rng.randint(0, 32 << 10),
                                seconds=rng.uniform(0.1, 1.5)))
                if rng.random() < cfg.long_stall_rate:
                    p.arm(Fault("stall", "s2r", rng.randint(0, 32 << 10), seconds=cfg.timeout + 1.0, long=True))
            mutate(state, cfg.density, g)
            checker.digests[v] = ss.state_digest(state)
            if cfg.kill_every and v % cfg.kill_every == 0:
                victim = slots[(v // cfg.kill_every - 1) % len(slots)]
                t = threading.Thread(target=kill_later, args=(victim, rng.uniform(0, cfg.kill_delay)), daemon=True)
                t.start()
                kill_threads.append(t)
            r = do_push(v)
            if r is None:
                hung = True
                findings.append(f"push v{v} did not return within {watchdog:.0f} s (timeout {cfg.timeout} s)")
                break
            if isinstance(r, BaseException):
                aborted = True
                findings.append(f"push v{v} raised {type(r).__name__}: {r} (soak stopped)\n"
                                + "".join(traceback.format_exception(r))[-2000:])
                v -= 1
                break
            account(v, *r)
            now = time.monotonic()
            if v % cfg.progress_every == 0 or now - last_log > cfg.progress_seconds or v == cfg.versions:
                last_log = now
                fc = _fault_counts(proxies, slots)
                log(f"v{v:>5}/{cfg.versions}  {now - t_start:7.1f} s  pushes ok {counts['fully_ok']} partial "
                    f"{counts['partially_ok']} failed {counts['failed']}  kills {fc['kills']} cuts {fc['cuts']} "
                    f"stalls {fc['stalls']}  checks {checker.checks} mismatches {len(checker.mismatches)}")
        res["versions_pushed"] = v
        for t in kill_threads:
            t.join(60)

        # ---- faults off; every receiver back; one more version must reach all of them with the right digest
        final = {"ok": False}
        if not hung and not aborted:
            for p in proxies:
                p.disarm()
            for s in slots:
                if not s.alive():
                    s.start()
            for s in slots:
                if not s.ready.wait(cfg.ready_timeout):
                    findings.append(f"receiver {s.index} did not come back within {cfg.ready_timeout:.0f} s")
            fv = v + 1
            mutate(state, cfg.density, g)
            checker.digests[fv] = ss.state_digest(state)
            r = do_push(fv)
            if r is None:
                hung = True
                findings.append(f"final push v{fv} did not return within {watchdog:.0f} s")
            elif isinstance(r, BaseException):
                findings.append(f"final push v{fv} raised {type(r).__name__}: {r}\n"
                                + "".join(traceback.format_exception(r))[-2000:])
            else:
                account(fv, *r, final=True)
                st = r[0]
                final["push"] = [{"peer": p.peer, "ok": p.ok, "version": p.version, "kind": p.kind,
                                  "error": p.error} for p in (st.peers if st is not None else [])]
                deadline = time.monotonic() + cfg.final_timeout
                while time.monotonic() < deadline and not all(s.last_version == fv for s in slots):
                    time.sleep(0.05)
                final["receivers"] = [{"receiver": s.index, "version": s.last_version,
                                       "digest_ok": s.last_version == fv
                                       and s.last_digest == checker.digests[fv]} for s in slots]
                final["version"] = fv
                final["ok"] = all(x["digest_ok"] for x in final["receivers"]) and all(
                    x["ok"] for x in final["push"])
                if not final["ok"]:
                    findings.append(f"final push v{fv}: not every receiver reached it with the trainer's digest: "
                                    f"{final}")
        res["final"] = final
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        checker.stopping = True
        if sender is not None and not hung:
            try:
                sender.close()
            except Exception as exc:                     # noqa: BLE001 - report, keep cleaning up
                findings.append(f"sender.close() raised {exc!r}")
        for s in slots:
            try:
                s.stop()
            except Exception:                            # noqa: BLE001
                if s.proc is not None and s.proc.poll() is None:
                    s.proc.kill()
        for p in proxies:
            p.close()
        threading.excepthook = saved_hook
        slog.handlers[:], slog.propagate, _ = saved_log
        slog.setLevel(saved_log[2])
        handler.close()
        if interrupted:
            shutil.rmtree(scratch, ignore_errors=True)
    time.sleep(0.1)
    leftover = [s.proc.pid for s in slots if s.proc is not None and s.proc.poll() is None]
    fc = _fault_counts(proxies, slots)
    res.update(
        wall_s=time.monotonic() - t_start,
        model_params=nparams,
        pushes=len(push_times), fully_ok=counts["fully_ok"], partially_ok=counts["partially_ok"],
        failed=counts["failed"], push_failed_raised=counts["push_failed_raised"], overran=counts["overran"],
        peer_retries=counts["peer_retries"],
        faults=fc,
        digest_checks=checker.checks, initial_checks=checker.initial_checks, digest_skipped=checker.skipped,
        mismatches=len(checker.mismatches), mismatch_details=checker.mismatches[:50],
        unknown_versions=checker.unknown[:50], reapplied=checker.reapplied, regressions=checker.regressions[:50],
        push_s={"p50": _pct(push_times, 50), "p90": _pct(push_times, 90), "p99": _pct(push_times, 99),
                "max": max(push_times, default=float("nan")),
                "mean": statistics.fmean(push_times) if push_times else float("nan")},
        deliveries=dict(kinds_ok), full_reasons=dict(full_why), delivered_bytes=dict(kinds_bytes), planned=dict(kinds_tried),
        errors=[{"count": n, "error": k, "example": error_examples[k]} for k, n in errors.most_common(25)],
        peak_rss_mib={"sender": _maxrss_kib() / 1024,
                      "receivers": [s.peak_rss_kib / 1024 for s in slots]},
        receivers=[{"receiver": s.index, "incarnations": s.incarnations, "killed": s.killed,
                    "unexpected_exits": s.unexpected_exits, "last_version": s.last_version} for s in slots],
        findings=findings, hung=hung, leftover_processes=leftover,
        sender_warnings=[{"count": n, "message": k} for k, n in handler.counts.most_common(25)],
        thread_exceptions=thread_errors[:20], thread_exceptions_total=len(thread_errors),
        push_ms=[round(x * 1e3, 1) for x in push_times],
        pushes_not_all_delta=push_records,
    )
    for s in slots:
        if s.unexpected_exits:
            findings.append(f"receiver {s.index} exited on its own: {s.unexpected_exits}")
    if thread_errors:
        findings.append(f"{len(thread_errors)} exceptions escaped threads, first: {thread_errors[0]['thread']}: "
                        f"{thread_errors[0]['error']}")
    if checker.unknown:
        findings.append(f"receivers reported {len(checker.unknown)} versions that were never pushed")
    if checker.regressions:
        findings.append(f"receivers went back to older versions {len(checker.regressions)} times")
    res["passed"] = (res["mismatches"] == 0 and res["final"].get("ok", False) and not hung
                     and res["versions_pushed"] == cfg.versions and not checker.unknown and not res["overran"]
                     and not thread_errors)
    if res["passed"] and not any(s.unexpected_exits for s in slots):
        shutil.rmtree(scratch, ignore_errors=True)
        res["scratch"] = None                 # nothing worth keeping: the receiver logs are deleted
    return res


class _LogCounter(logging.Handler):
    """Writes records to a file and counts them by message (numbers and addresses left out)."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self._f = open(path, "a")
        self.counts: collections.Counter = collections.Counter()
        self.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(message)s"))

    def emit(self, record) -> None:
        try:
            self.counts[f"{record.levelname} {_norm_error(record.getMessage())}"] += 1
            self.stream_write(self.format(record) + "\n")
        except Exception:                    # noqa: BLE001 - logging must never raise
            pass

    def stream_write(self, text: str) -> None:
        self.acquire()
        try:
            if not self._f.closed:
                self._f.write(text)
                self._f.flush()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self._f.close()
        finally:
            self.release()
        super().close()


def _fault_counts(proxies, slots) -> dict:
    c = collections.Counter()
    for p in proxies:
        c.update(p.counts)
    return {"kills": sum(s.killed for s in slots), "cuts": c["cuts"], "cuts_s2r": c["cuts_s2r"],
            "cuts_r2s": c["cuts_r2s"], "cuts_fin": c["cuts_fin"], "cuts_rst": c["cuts_rst"],
            "cuts_half": c["cuts_half"], "cuts_handshake": c["cuts_handshake"],
            "stalls": c["stalls_short"] + c["stalls_long"], "stalls_short": c["stalls_short"],
            "stalls_long": c["stalls_long"], "connections": c["connections"],
            "upstream_refused": c["upstream_refused"], "partitions": c["partitions"],
            "partition_refused": c["partition_refused"]}


def format_report(res: dict) -> str:
    cfg, f, ps = res["config"], res["faults"], res["push_s"]
    final = res.get("final", {})
    n = res["pushes"]
    lines = [
        (f"sparsesync soak on loopback: {res['versions_pushed']} versions under faults + 1 final, "
         f"{cfg['receivers']} receiver processes, model {res['model_params'] / 1e6:.2f}M bf16 params "
         f"(layers {cfg['layers']}, hidden {cfg['hidden']}, vocab {cfg['vocab']}), "
         f"{100 * cfg['density']:.2f}% of elements changed per version"),
        (f"Sender(timeout={cfg['timeout']} s, retries={cfg['retries']}, backoff={cfg['backoff']} s, digest=True); "
         f"wall time {res['wall_s']:.1f} s; {os.cpu_count()} CPU cores"),
        "",
        f"| {'figure':48s} | {'value':>14s} |",
        f"|{'-' * 50}|{'-' * 16}|",
    ]

    def row(k, val):
        lines.append(f"| {k:48s} | {val:>14} |")
    row("pushes (versions incl. the final one)", n)
    row("  every receiver reached the version", res["fully_ok"])
    row("  some receivers reached it", res["partially_ok"])
    row("  no receiver reached it (PushFailed)", res["failed"])
    row("kills (SIGKILL mid-run, restart at v0)", f["kills"])
    row("cuts", f["cuts"])
    row("  sender->receiver / receiver->sender", f"{f['cuts_s2r']} / {f['cuts_r2s']}")
    row("  FIN / RST / half-close", f"{f['cuts_fin']} / {f['cuts_rst']} / {f['cuts_half']}")
    row("  inside the handshake", f["cuts_handshake"])
    row("stalls (0.1-1.5 s / past the timeout)", f"{f['stalls_short']} / {f['stalls_long']}")
    row("connections through the proxies", f["connections"])
    row("partitions (unreachable for 1-6 versions)", f["partitions"])
    row("  refused (receiver down / partitioned)", f"{f['upstream_refused']} / {f['partition_refused']}")
    row("peer retries within a push", res["peer_retries"])
    row("digest checks (incl. each start at v0)", res["digest_checks"])
    row("digest MISMATCHES", res["mismatches"])
    row("push time p50 / p90 (ms)", f"{ps['p50'] * 1e3:.0f} / {ps['p90'] * 1e3:.0f}")
    row("push time p99 / max (ms)", f"{ps['p99'] * 1e3:.0f} / {ps['max'] * 1e3:.0f}")
    d = res["deliveries"]
    row("deliveries: delta / chain / full", f"{d.get('delta', 0)} / {d.get('chain', 0)} / {d.get('full', 0)}")
    for why, k in sorted(res.get("full_reasons", {}).items(), key=lambda x: -x[1]):
        row(f"  full: {why}"[:48], k)
    b = res["delivered_bytes"]
    row("  MB delivered: delta / chain / full",
        f"{b.get('delta', 0) / 1e6:.1f} / {b.get('chain', 0) / 1e6:.1f} / {b.get('full', 0) / 1e6:.1f}")
    row("peak RSS, sender (trainer + proxies), MiB", f"{res['peak_rss_mib']['sender']:.0f}")
    for i, m in enumerate(res["peak_rss_mib"]["receivers"]):
        inc = res["receivers"][i]["incarnations"]
        row(f"peak RSS, receiver {i} ({inc} processes), MiB", f"{m:.0f}")
    fv = final.get("version")
    row(f"final v{fv}: receivers with the trainer's digest",
        f"{sum(1 for x in final.get('receivers', []) if x['digest_ok'])}/{cfg['receivers']}")
    lines.append("")
    if res["errors"]:
        lines.append("peer errors reported by the sender (normalised, most frequent first):")
        for e in res["errors"][:12]:
            lines.append(f"  {e['count']:5d}  {e['error']}")
        lines.append("")
    if res.get("sender_warnings"):
        lines.append("sender log warnings (normalised, most frequent first):")
        for e in res["sender_warnings"][:8]:
            lines.append(f"  {e['count']:5d}  {e['message']}")
        lines.append("")
    if res["digest_skipped"]:
        lines.append(f"{res['digest_skipped']} reports skipped (the receiver moved on while hashing)")
    if res["reapplied"]:
        lines.append(f"{res['reapplied']} times a receiver applied a version it already held (a full update after "
                     "a lost ACK)")
    for x in res["findings"]:
        lines.append(f"FINDING: {x}")
    lines.append("PASS: no digest mismatch; every receiver ended at the final version with the trainer's digest"
                 if res["passed"] else "FAIL")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    d = SoakConfig()
    ap.add_argument("--versions", type=int, default=d.versions)
    ap.add_argument("--receivers", type=int, default=d.receivers)
    ap.add_argument("--kill-every", type=int, default=d.kill_every, help="kill one receiver every N versions (0: never)")
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--density", type=float, default=d.density, help="fraction of elements changed per version")
    ap.add_argument("--cut-rate", type=float, default=d.cut_rate)
    ap.add_argument("--handshake-cut-rate", type=float, default=d.handshake_cut_rate)
    ap.add_argument("--stall-rate", type=float, default=d.stall_rate)
    ap.add_argument("--long-stall-rate", type=float, default=d.long_stall_rate)
    ap.add_argument("--partition-rate", type=float, default=d.partition_rate)
    ap.add_argument("--timeout", type=float, default=d.timeout, help="the sender's push window (s)")
    ap.add_argument("--retries", type=int, default=d.retries)
    ap.add_argument("--max-seconds", type=float, default=d.max_seconds, help="stop (and fail) after this long")
    ap.add_argument("--progress-every", type=int, default=d.progress_every)
    ap.add_argument("--out", help="folder for soak.txt and soak.json (default: a new temporary folder)")
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.versions < 1 or args.receivers < 1:
        ap.error("--versions and --receivers must be at least 1")
    cfg = SoakConfig(versions=args.versions, receivers=args.receivers, kill_every=args.kill_every,
                     layers=args.layers, hidden=args.hidden, vocab=args.vocab, seed=args.seed,
                     density=args.density, cut_rate=args.cut_rate, handshake_cut_rate=args.handshake_cut_rate,
                     stall_rate=args.stall_rate, long_stall_rate=args.long_stall_rate,
                     partition_rate=args.partition_rate, timeout=args.timeout,
                     retries=args.retries, max_seconds=args.max_seconds, progress_every=args.progress_every)

    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        res = run_soak(cfg, log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print("interrupted; receivers stopped", file=sys.stderr)
        return 130
    text = format_report(res)
    print()
    print(text, end="")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sparsesync-soak-out-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.txt").write_text(text)
    (out / "soak.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out / 'soak.txt'} and {out / 'soak.json'}")
    if res.get("scratch"):
        print(f"receiver logs kept in {res['scratch']}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
