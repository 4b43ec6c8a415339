"""Loopback fan-out benchmark: what a push costs the trainer with 1 receiver and with N receivers.

    python bench/fanout.py [--receivers 4] [--layers 8 --hidden 1024] [--density 0.5] [--pushes 4] [--out DIR]

Receivers are separate processes (`sparsesync serve`) holding the same model built from a config; the trainer pushes
a chain of versions (trace-like +-1 ulp changes at the given density), each encoded once. The first push (session
set-up, digest handshake) is reported apart; the steady-state push time is the median of the rest. Every push is
checked: all receivers acknowledge the version with a verified state digest.

Results go to --out DIR (default: the scratch folder $TMPDIR/sparsesync-bench): fanout.json and fanout.txt (what is
printed on stdout). The committed results are only rewritten when asked: --out bench/results.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sparsesync.cli import _model_state, format_ratio  # noqa: E402
from sparsesync.netbench import SCRATCH, Tee  # noqa: E402
from sparsesync.session import Sender  # noqa: E402

TOKEN = "fanout-bench-token"


def perturb(state: dict, density: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        v = v.clone()
        flat = v.view(torch.int16).view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, int(flat.numel() * density / 100)),), generator=g).unique()
        flat[idx] += torch.randint(0, 2, (idx.numel(),), generator=g, dtype=torch.int16) * 2 - 1
        out[k] = v
    return out


def run(n: int, args, base: dict, chain: list) -> dict:
    tmp = Path(tempfile.mkdtemp())
    env = dict(os.environ, SPARSESYNC_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    procs, addrs = [], []
    try:
        for i in range(n):
            ready = tmp / f"{i}.addr"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sparsesync.cli", "serve", "--listen", "tcp://127.0.0.1:0", "--layers",
                 str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--ready-file",
                 str(ready)], env=env, stdout=subprocess.DEVNULL))
            while not ready.exists():
                assert procs[-1].poll() is None, "receiver died"
                time.sleep(0.05)
            addrs.append(ready.read_text())
        sender = Sender(addrs, token=TOKEN, base=base, base_version=0, progress=False, digest=args.digest)
        times, first = [], None
        for v, state in enumerate(chain, start=1):
            t0 = time.perf_counter()
            st = sender.push(state, v)
            dt = time.perf_counter() - t0
            assert st.ok and all(p.version == v for p in st.peers), str(st)
            if first is None:
                first = dt
            else:
                times.append(dt)
            print(f"  {n} receiver(s) v{v}: {dt * 1e3:8.1f} ms  encode {st.encode_s * 1e3:6.1f} ms  sent "
                  + ", ".join(f"{p.bytes:,} B ({p.kind})" for p in st.peers), file=sys.stderr)
        sender.close()
        # push_s: the steady state (median after the first push); None with a single push
        return {"receivers": n, "first_push_s": first, "push_s": statistics.median(times) if times else None,
                "pushes": times,
                "wire_bytes": st.wire_bytes, "sent_bytes_per_receiver": max(p.bytes for p in st.peers),
                "changed": st.changed}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--receivers", type=int, default=4, help="receivers of the many-receiver run (default 4)")
    ap.add_argument("--layers", type=int, default=8, help="model: transformer layers (default 8)")
    ap.add_argument("--hidden", type=int, default=1024, help="model: hidden size (default 1024)")
    ap.add_argument("--vocab", type=int, default=4096, help="model: vocabulary size (default 4096)")
    ap.add_argument("--density", type=float, default=0.5, help="percent changed per push (default 0.5)")
    ap.add_argument("--pushes", type=int, default=4,
                    help="pushes per run; the first is reported apart, the median of the rest is the push time "
                         "(default 4)")
    ap.add_argument("--digest", action="store_true", help="also verify the full state digest on every receiver")
    ap.add_argument("--out", metavar="DIR", default=str(SCRATCH),
                    help="write fanout.json and fanout.txt into DIR (default %(default)s; the committed results are "
                         "bench/results); a path ending in .json names the JSON file itself")
    args = ap.parse_args(argv)
    if args.pushes < 1 or args.receivers < 1:
        ap.error("--pushes and --receivers must be at least 1")
    path = Path(args.out) if args.out.endswith(".json") else Path(args.out) / "fanout.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with Tee(path.with_suffix(".txt")):
        run_all(args, path)
    return 0


def run_all(args, path: Path) -> None:
    _, base = _model_state(args.layers, args.hidden, 0, args.vocab)
    nparams = sum(t.numel() for t in base.values())
    chain, cur = [], base
    for i in range(args.pushes):
        cur = perturb(cur, args.density, seed=i)
        chain.append(cur)
    print(f"model: {nparams:,} bf16 params; {args.density}% changed per push; {os.cpu_count()} cores",
          file=sys.stderr)
    one = run(1, args, base, chain)
    many = run(args.receivers, args, base, chain)
    ratio = many["push_s"] / one["push_s"] if many["push_s"] and one["push_s"] else None
    print(f"\nfan-out on loopback, {nparams / 1e6:.0f}M bf16 params, {args.density}% changed, median push time "
          f"(encode once + deliver + all ACKs):")
    print("| receivers | push (ms) | first push incl. handshake (ms) | bytes per receiver |")
    print("|---|---|---|---|")
    for r in (one, many):
        push = f"{r['push_s'] * 1e3:.1f}" if r["push_s"] is not None else "-"
        print(f"| {r['receivers']} | {push} | {r['first_push_s'] * 1e3:.1f} | "
              f"{r['sent_bytes_per_receiver']:,} |")
    if ratio is None:
        print("(one push per run: no steady-state push time to compare; use --pushes 2 or more)")
    else:
        print(f"{args.receivers} receivers cost {format_ratio(ratio, 1, '.2f')} one receiver")
    path.write_text(json.dumps({"params": nparams, "density_pct": args.density, "one": one,
                                "many": many, "ratio": ratio, "cores": os.cpu_count()}, indent=1))
    print(f"wrote {path} and {path.with_suffix('.txt')}")


if __name__ == "__main__":
    sys.exit(main())
