"""``sparsesync bench``: time per weight sync over real or emulated links, sparsesync against the usual formats.

Emulated mode (default; needs root and iproute2): two network namespaces joined by a veth pair, each end shaped
with ``tc tbf`` at the link rate; the sender and the receiver run as separate processes inside them. The hosts'
addresses exist only inside those namespaces, which are removed when the benchmark ends (also on failure).
Real mode (``--peer HOST``): run ``sparsesync bench --serve`` on the receiving host first.

For each link rate, over the same link, one sync of a synthetic bf16 model at a trace-like density is timed end to
end (encode + wire + decode/apply, until the receiver acknowledges) for: dense bytes, dense + zstd, int32 index + raw
value (SparseRL-Sync / vLLM sparse_nccl), sparsesync in wire format 1 (``sparsesync-v1``: one segment set per tensor,
order-0 coding) and sparsesync (format 2, the default: dtype spaces, context coding). The weights are a synthetic bf16
model (``--params``, ``--tensor-elems``: 4096 gives a many-tensor layout) or two steps of a trace file made by
bench/trace.py or bench/realtrace.py (``--trace PATH``; both hosts read the same file). Every method's result on the receiver is checked against
the sender's state digest. Output: a table on stdout, and in ``--out DIR`` (default: a scratch folder,
``$TMPDIR/sparsesync-bench``; committed results are only written with an explicit ``--out bench/results``) the same
table as net.txt, net.json and (with matplotlib installed) net.png.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

METHODS = ["dense", "dense+zstd", "int32+raw", "sparsesync-v1", "sparsesync"]
SESSION_FORMAT = {"sparsesync": 2, "sparsesync-v1": 1}     # sparsesync methods: the wire format their Sender writes
SUBNET = "10.213.77"
BASE_PORT = 7400
TOKEN_ENV = "SPARSESYNC_BENCH_TOKEN"
# where benchmarks write unless told otherwise (bench/codec.py, bench/fanout.py and bench/trace.py use it too):
# never into the committed bench/results/ without an explicit --out

def machine() -> str:
    """One line naming this machine for benchmark output: CPU model, cores, memory, OS, Python and torch."""
    import platform
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")

SCRATCH = Path(tempfile.gettempdir()) / "sparsesync-bench"


class Tee:
    """``with Tee(path):`` copies everything printed to stdout into ``path`` as well (the .txt of a result)."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")
        self._stdout = sys.stdout
        sys.stdout = self
        return self

    def write(self, s: str) -> int:
        self._file.write(s)
        return self._stdout.write(s)

    def flush(self) -> None:
        self._file.flush()
        self._stdout.flush()

    def isatty(self) -> bool:
        return False

    def __exit__(self, *exc):
        sys.stdout = self._stdout
        self._file.close()


def add_args(p) -> None:
    p.add_argument("--params", type=float, default=0.5e9, help="model size in bf16 parameters (default 0.5e9)")
    p.add_argument("--density", type=float, default=0.5, help="percent of elements changed per step (default 0.5)")
    p.add_argument("--rates", default="100mbit,1gbit,10gbit", help="emulated link rates, comma separated")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"methods to time, comma separated (default {','.join(METHODS)})")
    p.add_argument("--tensor-elems", type=int, default=1 << 24,
                   help="elements per synthetic tensor (default 16777216)")
    p.add_argument("--out", metavar="DIR", default=str(SCRATCH),
                   help=f"write net.txt, net.json and net.png into DIR (default {SCRATCH}; "
                        "the committed results are bench/results)")
    p.add_argument("--peer", metavar="HOST", help="real mode: receiving host running `sparsesync bench --serve`")
    p.add_argument("--serve", action="store_true", help="real mode: act as the receiving host")
    p.add_argument("--listen", default="127.0.0.1", help="--serve: address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=BASE_PORT,
                   help=f"TCP port of the sparsesync receiver; the baselines use PORT+1 (default {BASE_PORT})")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic model and its update (default 0)")
    p.add_argument("--trace", metavar="PATH", help="weights from a trace file (bench/trace.py, bench/realtrace.py): "
                   "the sync from step --trace-step to the next; replaces the synthetic model")
    p.add_argument("--trace-step", type=int, default=0, help="--trace: the step the receivers hold (default 0)")
    p.add_argument("--streams", type=int, default=1, help="sparsesync: TCP connections per peer (default 1)")
    p.add_argument("--worker", choices=["send", "recv"], help=argparse_hidden())
    p.add_argument("--stop-server", action="store_true", help=argparse_hidden())


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


# ---------------------------------------------------------------------------------------------------------------------
# synthetic model (both sides build the same one from the seed)

def bench_states(args, want_new: bool):
    """(base, new) of the benchmark: two steps of ``--trace`` or the synthetic model."""
    if getattr(args, "trace", None):
        steps = torch.load(args.trace, weights_only=True)["steps"]
        if not 0 <= args.trace_step < len(steps) - 1:
            from .cli import CLIError
            raise CLIError(f"--trace-step {args.trace_step}: the trace has steps 0..{len(steps) - 1}")
        base = {k: v.contiguous() for k, v in steps[args.trace_step].items()}
        return base, ({k: v.contiguous() for k, v in steps[args.trace_step + 1].items()} if want_new else {})
    return model_states(args.params, args.density, args.tensor_elems, args.seed, want_new)


def model_states(params: float, density_pct: float, tensor_elems: int, seed: int, want_new: bool):
    """Base state and (optionally) the next state: trace-like +-1..+-8 ulp moves at the given density."""
    g = torch.Generator().manual_seed(seed)
    gc = torch.Generator().manual_seed(seed + 1)          # changes: their own stream, so base is the same either way
    total = int(params)
    base, new = {}, {}
    i = 0
    steps = torch.tensor([1, 2, 3, 4, 6, 8], dtype=torch.int16)
    probs = torch.tensor([0.91, 0.037, 0.016, 0.009, 0.014, 0.014])
    while total > 0:
        n = min(tensor_elems, total)
        w = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
        name = f"model.layers.{i // 7}.w{i % 7}"
        base[name] = w
        if want_new:
            k = int(n * density_pct / 100)
            idx = torch.randint(0, n, (k,), generator=gc).unique()
            mag = steps[torch.multinomial(probs, idx.numel(), replacement=True, generator=gc)]
            sign = torch.randint(0, 2, (idx.numel(),), generator=gc, dtype=torch.int16) * 2 - 1
            nw = w.clone()
            nw.view(torch.int16)[idx] += mag * sign
            new[name] = nw
        total -= n
        i += 1
    return base, new


# ---------------------------------------------------------------------------------------------------------------------
# baseline formats: a blob protocol (u8 method, u64 length, payload) and the receiver's apply

def _recv_exact(sock, n: int) -> bytearray:
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(mv[got:], min(n - got, 1 << 22))
        if k == 0:
            raise ConnectionError("closed")
        got += k
    return buf


def _blob_encode(method: str, base: dict, new: dict) -> list[bytes]:
    import zstandard
    out = []
    for name, t in new.items():
        raw = t.reshape(-1).view(torch.int16).numpy()
        if method == "dense":
            out.append(raw.tobytes())
        elif method == "dense+zstd":
            out.append(zstandard.ZstdCompressor(level=1, threads=-1).compress(raw.tobytes()))
        elif method == "int32+raw":
            o, nv = base[name].reshape(-1).view(torch.int16), t.reshape(-1).view(torch.int16)
            idx = (nv != o).nonzero().reshape(-1)
            out.append(idx.to(torch.int32).numpy().tobytes() + nv[idx].numpy().tobytes())
    return out


def _blob_apply(method: str, blobs: list, state: dict) -> None:
    import zstandard
    for (name, t), blob in zip(state.items(), blobs):
        dst = t.reshape(-1).view(torch.int16).numpy()
        if method == "dense":
            dst[:] = np.frombuffer(blob, dtype=np.int16)
        elif method == "dense+zstd":
            dst[:] = np.frombuffer(zstandard.ZstdDecompressor().decompress(bytes(blob)), dtype=np.int16)
        else:
            k = len(blob) // 6
            idx = np.frombuffer(blob, dtype=np.int32, count=k)
            dst[idx] = np.frombuffer(blob, dtype=np.int16, count=k, offset=4 * k)


def _serve_worker(args) -> int:
    """Receiving host: a sparsesync Receiver and a blob server for the baselines; both start from the base state."""
    from .digest import state_digest
    from .session import Receiver
    base, _ = bench_states(args, want_new=False)
    token = os.environ.get(TOKEN_ENV) or "sparsesync-bench-token"
    r = Receiver({k: v.clone() for k, v in base.items()}, f"tcp://{args.listen}:{args.port}", token=token,
                 version=0).start()
    r1 = Receiver({k: v.clone() for k, v in base.items()}, f"tcp://{args.listen}:{args.port + 2}", token=token,
                  version=0).start()          # the receiver of method sparsesync-v1
    srv = socket.create_server((args.listen, args.port + 1))
    print("ready", flush=True)
    scratch = {k: v.clone() for k, v in base.items()}
    names = list(base)
    try:
        while True:
            conn, _ = srv.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while True:
                    try:
                        head = _recv_exact(conn, 9)
                    except ConnectionError:
                        break
                    code, count = struct.unpack("<BQ", head)
                    if code == 255:
                        return 0
                    if code in (252, 254):      # digest of a sparsesync receiver (252: sparsesync-v1's)
                        conn.sendall(state_digest((r1 if code == 252 else r).state).encode())
                        continue
                    if code == 253:      # wire only: receive and discard (phase timing)
                        for _ in range(count):
                            (n,) = struct.unpack("<Q", _recv_exact(conn, 8))
                            _recv_exact(conn, n)
                        conn.sendall(b"0" * 64)
                        continue
                    method = METHODS[code]
                    blobs = []
                    for _ in range(count):
                        (n,) = struct.unpack("<Q", _recv_exact(conn, 8))
                        blobs.append(_recv_exact(conn, n))
                    _blob_apply(method, blobs, {k: scratch[k] for k in names})
                    conn.sendall(state_digest(scratch).encode())
                    for k in names:             # back to base for the next method
                        scratch[k].copy_(base[k])
    finally:
        r.stop()
        r1.stop()
        srv.close()


def _link_bytes(dev: str | None) -> int:
    if dev is None:
        return 0
    return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text()) + \
        int(Path(f"/sys/class/net/{dev}/statistics/rx_bytes").read_text())


def _send_worker(args) -> int:
    """Sending host: time each method end to end, print one JSON line per method."""
    from .digest import state_digest
    from .session import Sender
    base, new = bench_states(args, want_new=True)
    want = state_digest(new)
    dev = os.environ.get("SPARSESYNC_BENCH_DEV")
    token = os.environ.get(TOKEN_ENV) or "sparsesync-bench-token"
    methods = args.methods.split(",")
    changed = sum(int((new[k].view(torch.int16) != base[k].view(torch.int16)).sum()) for k in base)
    for method in methods:
        if method in SESSION_FORMAT:
            continue
        sock = socket.create_connection((args.peer, args.port + 1), timeout=600)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        b0 = _link_bytes(dev)
        t0 = time.perf_counter()
        blobs = _blob_encode(method, base, new)
        t_enc = time.perf_counter() - t0
        sock.sendall(struct.pack("<BQ", METHODS.index(method), len(blobs)))
        for b in blobs:
            sock.sendall(struct.pack("<Q", len(b)))
            sock.sendall(b)
        got = _recv_exact(sock, 64).decode()
        total = time.perf_counter() - t0
        payload = sum(len(b) for b in blobs)
        sock.close()
        print(json.dumps({"method": method, "seconds": total, "encode_s": t_enc, "payload_bytes": payload,
                          "link_bytes": _link_bytes(dev) - b0, "exact": got == want, "changed": changed}),
              flush=True)
    for method in [m for m in methods if m in SESSION_FORMAT]:
        fmt = SESSION_FORMAT[method]
        port = args.port if fmt == 2 else args.port + 2
        # phases alone, for the pipelining ratio: encode alone, the same bytes over the same link alone
        from .codec import Encoder
        from .session import DEFAULT_SESSION_BUCKET
        enc = Encoder(base, 0, bucket_bytes=DEFAULT_SESSION_BUCKET, format=fmt)
        t0 = time.perf_counter()
        buckets = enc.encode(new, 1).buckets
        phase_encode = time.perf_counter() - t0
        del enc
        sock = socket.create_connection((args.peer, args.port + 1), timeout=600)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        sock.sendall(struct.pack("<BQ", 253, len(buckets)))
        for b in buckets:
            sock.sendall(struct.pack("<Q", len(b)))
            sock.sendall(b)
        _recv_exact(sock, 64)
        phase_wire = time.perf_counter() - t0
        sock.close()
        sender = Sender([f"tcp://{args.peer}:{port}"], token=token, base=base, base_version=0, progress=False,
                        timeout=600, streams=args.streams, format=fmt)
        sender.connect()          # session set-up (handshake, base digest check) happens once, not per sync
        b0 = _link_bytes(dev)
        t0 = time.perf_counter()
        st = sender.push(new, 1)
        total = time.perf_counter() - t0
        link = _link_bytes(dev) - b0
        p = st.peers[0]
        sock = socket.create_connection((args.peer, args.port + 1), timeout=60)
        sock.sendall(struct.pack("<BQ", 254 if fmt == 2 else 252, 0))
        got = _recv_exact(sock, 64).decode()
        sock.close()
        slowest = max(phase_encode, phase_wire, p.apply_s)
        print(json.dumps({"method": method, "format": fmt, "seconds": total, "encode_s": st.encode_s,
                          "phase_encode_s": phase_encode, "phase_wire_s": phase_wire, "phase_apply_s": p.apply_s,
                          "pipelining_ratio": total / slowest, "payload_bytes": st.wire_bytes,
                          "link_bytes": link, "exact": got == want and p.ok, "changed": changed,
                          "error": p.error}), flush=True)
        sender.close()
    if args.stop_server:
        sock = socket.create_connection((args.peer, args.port + 1), timeout=60)
        sock.sendall(struct.pack("<BQ", 255, 0))
        sock.close()
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# emulated links

def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class EmulatedLink:
    """Two namespaces and a shaped veth pair; removed on exit, also on failure."""

    def __init__(self, rate: str):
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"ssb-a{tag}", f"ssb-b{tag}")
        self.dev = (f"ssba{tag}", f"ssbb{tag}")
        self.addr = (f"{SUBNET}.1", f"{SUBNET}.2")
        self.rate = rate

    def __enter__(self):
        try:
            for ns in self.ns:
                _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", self.dev[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.dev[1],
                 "netns", self.ns[1])
            for ns, dev, addr in zip(self.ns, self.dev, self.addr):
                _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                # tbf: burst must hold at least rate/HZ; latency bounds the queue
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                     "burst", _burst(self.rate), "latency", "50ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for ns in self.ns:
            _run("ip", "netns", "del", ns, check=False)

    def exec(self, side: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side]]


def _rate_bits(rate: str) -> float:
    r = rate.lower().rstrip("bit").rstrip("/s")
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}
    return float(r[:-1]) * mult[r[-1]] if r[-1] in mult else float(r)


def _burst(rate: str) -> str:
    return str(max(64 * 1024, int(_rate_bits(rate) / 8 / 250) * 2))


def emulation_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    r = _run("ip", "netns", "add", f"ssb-probe{os.getpid()}", check=False)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    _run("ip", "netns", "del", f"ssb-probe{os.getpid()}", check=False)
    return None


def _worker_cmd(args, role: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "sparsesync.cli", "bench", "--worker", role, "--params", str(args.params),
            "--density", str(args.density), "--tensor-elems", str(args.tensor_elems), "--seed", str(args.seed),
            "--port", str(args.port), "--methods", args.methods, "--streams", str(args.streams)] + _trace_args(args) + \
        extra


def _trace_args(args) -> list[str]:
    return ["--trace", str(Path(args.trace).resolve()), "--trace-step", str(args.trace_step)] if args.trace else []


def run_emulated(args) -> list[dict]:
    why = emulation_available()
    if why:
        from .cli import CLIError
        raise CLIError(f"link emulation unavailable: {why} (or use --peer HOST with a real receiving host)")
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent)] +
                                                      [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cpus = sorted(os.sched_getaffinity(0))
    half = max(1, len(cpus) // 2)
    split = (cpus[:half], cpus[half:] or cpus[:half])    # sender's and receiver's CPUs
    print(f"emulated hosts: sender on CPUs {split[0]}, receiver on CPUs {split[1]}", file=sys.stderr)
    for rate in args.rates.split(","):
        print(f"[{rate}] setting up the emulated link and both hosts ...", file=sys.stderr, flush=True)
        with EmulatedLink(rate) as link:
            env_b = dict(env, SPARSESYNC_BENCH_CPUS=",".join(map(str, split[1])))
            srv = subprocess.Popen(link.exec(1) + _worker_cmd(args, "recv", ["--listen", link.addr[1]]), env=env_b,
                                   stdout=subprocess.PIPE, text=True)
            try:
                line = srv.stdout.readline()
                if line.strip() != "ready":
                    from .cli import CLIError
                    raise CLIError(f"[{rate}] the receiving worker did not start (it said {line!r})")
                env_a = dict(env, SPARSESYNC_BENCH_DEV=link.dev[0],
                             SPARSESYNC_BENCH_CPUS=",".join(map(str, split[0])))
                out = subprocess.run(link.exec(0) + _worker_cmd(args, "send", ["--peer", link.addr[1],
                                                                                "--stop-server"]),
                                     env=env_a, capture_output=True, text=True, timeout=3600)
                if out.returncode != 0:
                    from .cli import CLIError
                    sys.stderr.write(out.stderr[-3000:])
                    raise CLIError(f"[{rate}] the sending worker failed with exit status {out.returncode} (its "
                                   "stderr is above)")
                for ln in out.stdout.splitlines():
                    if ln.startswith("{"):
                        row = json.loads(ln)
                        row["rate"] = rate
                        row["rate_bits"] = _rate_bits(rate)
                        rows.append(row)
                        print(f"[{rate}] {row['method']:10s} {row['seconds']:8.3f} s  {row['link_bytes']:>13,} "
                              f"link bytes  exact={row['exact']}", file=sys.stderr, flush=True)
            finally:
                try:
                    srv.wait(30)
                except subprocess.TimeoutExpired:
                    srv.kill()
                    srv.wait()
    return rows


def report(rows: list[dict], args) -> None:
    out = Path(args.out)
    with Tee(out / "net.txt"):
        _report(rows, args, out)


def _report(rows: list[dict], args, out: Path) -> None:
    from .cli import format_ratio
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    trace, step = getattr(args, "trace", None), getattr(args, "trace_step", 0)
    elems = getattr(args, "tensor_elems", None)
    what = f"trace {trace} step {step} -> {step + 1}" if trace else \
        f"{args.params / 1e9:.2f}B bf16 params" + (f" in tensors of {elems} elements" if elems else "") + \
        f", {args.density}% changed"
    print(f"\nsparsesync bench: {what}, one sync, end to end "
          "(encode + wire + apply, bit-exact digest checked); each emulated host pinned to its own half of the "
          "CPUs")
    print(f"| link | {' | '.join(m + ' s' for m in METHODS)} | sparsesync speed-up vs dense | link bytes int32+raw "
          "/ sparsesync | link bytes sparsesync-v1 / sparsesync |")
    print("|---" * (len(METHODS) + 4) + "|")
    for rate in rates:
        by = {r["method"]: r for r in rows if r["rate"] == rate}
        cells = [f"{by[m]['seconds']:.3f}" + ("" if by[m]["exact"] else " (NOT EXACT)") if m in by else "-"
                 for m in METHODS]
        # "-" where a baseline was not run (--methods) or a count is zero: never "0.0x" or "inf"
        sp = format_ratio(by["dense"]["seconds"], by["sparsesync"]["seconds"], ".1f") \
            if "dense" in by and "sparsesync" in by else "-"
        lb = format_ratio(by["int32+raw"]["link_bytes"], by["sparsesync"]["link_bytes"], ".2f") \
            if "int32+raw" in by and "sparsesync" in by else "-"
        l1 = format_ratio(by["sparsesync-v1"]["link_bytes"], by["sparsesync"]["link_bytes"], ".3f") \
            if "sparsesync-v1" in by and "sparsesync" in by else "-"
        print(f"| {rate} | {' | '.join(cells)} | {sp} | {lb} | {l1} |")
    print("\nsparsesync phases (each alone) and pipelining (end to end / slowest phase):")
    print("| link | method | encode s | wire s | decode+apply s | end to end s | link bytes | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] in SESSION_FORMAT and "phase_encode_s" in r:
            print(f"| {r['rate']} | {r['method']} | {r['phase_encode_s']:.3f} | {r['phase_wire_s']:.3f} | {r['phase_apply_s']:.3f} "
                  f"| {r['seconds']:.3f} | {r['link_bytes']:,} | {r['pipelining_ratio']:.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "net.json").write_text(json.dumps({"params": args.params, "density_pct": args.density,
                                              "tensor_elems": elems, "trace": trace, "trace_step": step,
                                              "rows": rows}, indent=1))
    print(f"wrote {out / 'net.txt'}")
    print(f"wrote {out / 'net.json'}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG plot; pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in METHODS:
        pts = sorted((r["rate_bits"], r["seconds"]) for r in rows if r["method"] == m)
        if pts:
            ax.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Gbit/s)")
    ax.set_ylabel("time per sync (s)")
    ax.set_title(f"trace {Path(trace).name}" if trace else
                 f"{args.params / 1e9:.2f}B bf16 params, {args.density}% changed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "net.png", dpi=110)
    print(f"wrote {out / 'net.png'}")


def _pin_from_env() -> None:
    """Emulated hosts get their own CPUs (SPARSESYNC_BENCH_CPUS="0,1"), as real hosts would: otherwise the sender's
    encoding and the receiver's decoding compete for the same cores, which no pair of real hosts does."""
    cpus = os.environ.get("SPARSESYNC_BENCH_CPUS")
    if cpus:
        ids = {int(c) for c in cpus.split(",")}
        os.sched_setaffinity(0, ids)
        torch.set_num_threads(len(ids))
        os.environ["SPARSESYNC_THREADS"] = str(len(ids))


def main(args) -> int:
    _pin_from_env()
    if args.worker == "recv":
        return _serve_worker(args)
    if args.worker == "send":
        return _send_worker(args)
    if args.serve:
        return _serve_worker(args)
    if args.peer:
        args.stop_server = False
        rows = []
        for ln in subprocess.run([sys.executable, "-m", "sparsesync.cli", "bench", "--worker", "send", "--peer",
                                  args.peer, "--params", str(args.params), "--density", str(args.density),
                                  "--tensor-elems", str(args.tensor_elems), "--seed", str(args.seed), "--port",
                                  str(args.port), "--methods", args.methods, "--streams", str(args.streams)] +
                                 _trace_args(args),
                                 capture_output=True, text=True,
                                 check=True).stdout.splitlines():
            if ln.startswith("{"):
                row = json.loads(ln)
                row.update(rate=f"real:{args.peer}", rate_bits=0)
                rows.append(row)
        report(rows, args)
        return 0
    rows = run_emulated(args)
    report(rows, args)
    return 0 if all(r["exact"] for r in rows) else 1
