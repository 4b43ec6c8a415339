"""Codec benchmark: bytes per changed element against baselines and the information bound, and CPU speed.

    python bench/codec.py size     [--elements 67108864]          synthetic +-1 ulp updates at several densities
    python bench/codec.py trace    [--trace PATH]                 realistic trace written by bench/trace.py
    python bench/codec.py speed    [--speed-elements 268435456]   encode / decode+apply vs naive torch and clone
    python bench/codec.py all                                     the three

Results go to --out DIR (default: the scratch folder $TMPDIR/sparsesync-bench): codec.json (merged with what is
already there, so runs of single parts add up) and codec.txt (what is printed on stdout). The committed results are
only rewritten when asked: --out bench/results. The trace is read from --trace (default: trace.pt in the scratch
folder, where `python bench/trace.py` writes it by default).

Every sparsesync result is verified bit-exact (state_digest of the receiver == sender) before it is reported.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sparsesync as ss  # noqa: E402
from sparsesync import kernels  # noqa: E402
from sparsesync.netbench import SCRATCH, Tee, machine  # noqa: E402



# ---------------------------------------------------------------------------------------------------------------------
# baselines (what other systems send), measured on the same data

def _changed(old: torch.Tensor, new: torch.Tensor):
    iv = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[old.element_size()]
    o, n = old.reshape(-1).view(iv), new.reshape(-1).view(iv)
    idx = (o != n).nonzero().reshape(-1)
    return idx, o[idx], n[idx]


def baseline_int32_raw(pairs) -> int:
    """SparseRL-Sync / vLLM sparse_nccl: int32 index + raw new value per changed element."""
    return sum(idx.numel() * (4 + new.element_size()) for idx, _, new in (_changed(o, n) for o, n in pairs))


def baseline_gap_zstd(pairs, level: int = 3) -> int:
    """PULSE-style: index gaps as uint16 (escape 65535 + uint32) then zstd, raw values then zstd."""
    cctx = zstandard.ZstdCompressor(level=level)
    total = 0
    for o, n in pairs:
        idx, _, nv = _changed(o, n)
        if idx.numel() == 0:
            continue
        gaps = torch.diff(idx, prepend=torch.tensor([-1])).numpy() - 1
        out = bytearray()
        small = gaps < 65535
        if small.all():
            out += gaps.astype(np.uint16).tobytes()
        else:
            for g in gaps:
                out += np.uint16(min(g, 65535)).tobytes() + (np.uint32(g).tobytes() if g >= 65535 else b"")
        total += len(cctx.compress(bytes(out))) + len(cctx.compress(nv.numpy().tobytes()))
    return total


def baseline_dense_zstd(pairs, level: int = 3) -> int:
    cctx = zstandard.ZstdCompressor(level=level, threads=-1)
    return sum(len(cctx.compress(n.reshape(-1).view(torch.uint8).numpy().tobytes())) for _, n in pairs)


def info_bound_bits(pairs) -> dict:
    """Order-0 bound: per tensor N*H(p) bits for positions + (global) entropy of the bit-pattern differences."""
    pos_bits, deltas = 0.0, []
    for o, n in pairs:
        idx, ov, nv = _changed(o, n)
        N, k = o.numel(), idx.numel()
        if k and k < N:
            p = k / N
            pos_bits += N * (-(p * math.log2(p) + (1 - p) * math.log2(1 - p)))
        deltas.append((nv.to(torch.int64) - ov.to(torch.int64)))
    d = torch.cat(deltas) if deltas else torch.zeros(0, dtype=torch.int64)
    _, counts = torch.unique(d, return_counts=True)
    p = counts.double() / max(1, d.numel())
    val_bits = float(-(p * p.log2()).sum()) * d.numel()
    return {"position_bits": pos_bits, "value_bits": val_bits, "changed": int(d.numel())}


# ---------------------------------------------------------------------------------------------------------------------

def measure_sparsesync(base: dict, new: dict, values: str) -> dict:
    enc = ss.Encoder(base=base, base_version=0, values=values)
    t0 = time.perf_counter()
    up = enc.encode(new, version=1)
    t_enc = time.perf_counter() - t0
    recv = {k: v.clone() for k, v in base.items()}
    dec = ss.Decoder(recv, version=0)
    t0 = time.perf_counter()
    dec.apply(up)
    t_dec = time.perf_counter() - t0
    exact = ss.state_digest(recv) == ss.state_digest(new)
    if not exact:
        raise SystemExit(f"NOT BIT-EXACT ({values}) — benchmark aborted")
    s = up.stats
    return {"wire_bytes": s.wire_bytes, "header_bytes": s.header_bytes, "changed": s.changed,
            "bytes_per_changed": s.wire_bytes / s.changed if s.changed else None,     # None (not inf): no change
            "dense_tensors": s.dense_tensors, "buckets": s.buckets,
            "encode_s": t_enc, "decode_apply_s": t_dec, "bit_exact": exact}


def synthetic(elements: int, density: float, seed: int, tensor_elems: int = 1 << 22, ulps=(1,)) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base, new = {}, {}
    left, i = elements, 0
    while left > 0:
        n = min(tensor_elems, left)
        w = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
        k = int(round(n * density))
        idx = torch.randperm(n, generator=g)[:k]
        step = torch.tensor(ulps, dtype=torch.int16)[torch.randint(0, len(ulps), (k,), generator=g)]
        sign = torch.randint(0, 2, (k,), generator=g, dtype=torch.int16) * 2 - 1
        nw = w.clone()
        nw.view(torch.int16)[idx] += step * sign
        base[f"layer{i}.weight"], new[f"layer{i}.weight"] = w, nw
        left -= n
        i += 1
    return base, new


def _per(nbytes: float, k: int) -> float | None:
    """Bytes per changed element; None (printed "-") when nothing changed, never inf."""
    return nbytes / k if k else None


def size_row(label: str, base: dict, new: dict, dense_zstd: bool) -> dict:
    pairs = [(base[k], new[k]) for k in base]
    bound = info_bound_bits(pairs)
    k = bound["changed"]
    row = {"label": label, "elements": sum(t.numel() for t in base.values()), "changed": k}
    row["density_pct"] = 100 * k / row["elements"] if row["elements"] else 0.0
    row["bound_B_per_changed"] = _per((bound["position_bits"] + bound["value_bits"]) / 8, k)
    for values in ("delta", "raw"):
        r = measure_sparsesync(base, new, values)
        row[f"ss_{values}_B"] = r["bytes_per_changed"]
        row[f"ss_{values}_dense_tensors"] = r["dense_tensors"]
    row["ratio_to_bound"] = row["ss_delta_B"] / row["bound_B_per_changed"] \
        if row["ss_delta_B"] and row["bound_B_per_changed"] else None
    row["int32_raw_B"] = _per(baseline_int32_raw(pairs), k)
    row["gap_zstd_B"] = _per(baseline_gap_zstd(pairs), k)
    if dense_zstd:
        row["dense_zstd_B"] = _per(baseline_dense_zstd(pairs), k)
    row["dense_B"] = _per(sum(t.numel() * t.element_size() for t in base.values()), k)
    return row


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """Markdown table; "-" for a value that is missing (a baseline not run) or undefined (nothing changed)."""
    print("| " + " | ".join(h for h, _, _ in cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for _, k, f in cols) + " |")


SIZE_COLS = [("data", "label", "s"), ("dense tensors", "ss_delta_dense_tensors", "d"), ("changed %", "density_pct", ".2f"), ("bound B", "bound_B_per_changed", ".3f"),
             ("sparsesync delta B", "ss_delta_B", ".3f"), ("/bound", "ratio_to_bound", ".3f"),
             ("sparsesync raw B", "ss_raw_B", ".3f"), ("int32+raw B", "int32_raw_B", ".2f"),
             ("gaps+zstd B", "gap_zstd_B", ".2f"), ("dense zstd B", "dense_zstd_B", ".1f"),
             ("dense B", "dense_B", ".1f")]


def run_size(args) -> list[dict]:
    rows = []
    for density in args.densities:
        t0 = time.perf_counter()
        base, new = synthetic(args.elements, density / 100, seed=1)
        rows.append(size_row(f"synthetic {density}% +-1ulp", base, new, dense_zstd=(density == 0.6)))
        print(f"  [{density}% done in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    # the automatic dense fallback: one tensor overwritten with incompressible (uniformly random) bit patterns next
    # to sparse ones. (Re-initialised weights do not trigger it: their entropy-coded values cost ~12-14 bits, less
    # than the 16 of dense bf16, so sparse coding rightly stays.)
    base, new = synthetic(args.elements // 4, 0.006, seed=2)
    k = next(iter(base))
    g = torch.Generator().manual_seed(3)
    new[k] = torch.randint(-32768, 32768, new[k].shape, generator=g, dtype=torch.int32).to(torch.int16) \
        .view(torch.bfloat16)
    rows.append(size_row("mixed: 1 of 4 tensors random bits", base, new, dense_zstd=False))
    return rows


def run_trace(args) -> list[dict]:
    trace = torch.load(args.trace, weights_only=False)
    steps = trace["steps"]
    rows = []
    for i in range(1, len(steps)):
        row = size_row(f"trace step {i}", steps[i - 1], steps[i], dense_zstd=(i == 1))
        rows.append(row)
        if row["ss_delta_B"] is None:
            print(f"  [trace step {i}: nothing changed]", file=sys.stderr)
        else:
            print(f"  [trace step {i}: {row['ss_delta_B']:.3f} B/changed, {row['ratio_to_bound']:.3f}x bound]",
                  file=sys.stderr)
    # a chain through one encoder/decoder pair, checking every step
    enc = ss.Encoder(base=steps[0], base_version=0)
    recv = {k: v.clone() for k, v in steps[0].items()}
    dec = ss.Decoder(recv, version=0)
    for i in range(1, len(steps)):
        dec.apply(enc.encode(steps[i], version=i))
        assert ss.state_digest(recv) == ss.state_digest(steps[i]), f"chain diverged at step {i}"
    return rows


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_speed(args) -> dict:
    """Steady state of a training run: one encoder and one decoder, a chain of updates at 1% density each."""
    n = args.speed_elements
    base, s1 = synthetic(n, 0.01, seed=4, tensor_elems=1 << 26)
    chain = [base, s1]
    for i in range(args.repeat):
        g = torch.Generator().manual_seed(100 + i)
        nxt = {}
        for k, t in chain[-1].items():
            t = t.clone()
            flat = t.view(torch.int16)
            idx = torch.randint(0, flat.numel(), (int(flat.numel() * 0.01),), generator=g).unique()
            flat[idx] += (torch.randint(0, 2, (idx.numel(),), generator=g, dtype=torch.int16) * 2 - 1)
            nxt[k] = t
        chain.append(nxt)
    model_bytes = n * 2
    old_t, new_t = list(base.values()), list(s1.values())

    def naive():
        for o, nw in zip(old_t, new_t):
            idx = (nw.view(torch.int16) != o.view(torch.int16)).nonzero()
            nw.view(torch.int16)[idx]

    t_naive = _best(naive, args.repeat)
    t_clone = _best(lambda: [t.clone() for t in new_t], args.repeat)
    enc = ss.Encoder(base=base, base_version=0)
    recv = {k: v.clone() for k, v in base.items()}
    dec = ss.Decoder(recv, version=0)
    t_enc, t_dec, changed, wire = [], [], 0, 0
    for v in range(1, len(chain)):
        t0 = time.perf_counter()
        up = enc.encode(chain[v], version=v)
        t_enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dec.apply(up)
        t_dec.append(time.perf_counter() - t0)
        changed, wire = up.stats.changed, up.stats.wire_bytes
    exact = ss.state_digest(recv) == ss.state_digest(chain[-1])
    if not exact:
        raise SystemExit("speed run NOT BIT-EXACT")
    t_digest = _best(lambda: ss.state_digest(s1), args.repeat)
    te, td = min(t_enc[1:]), min(t_dec[1:])
    return {"elements": n, "density_pct": 100 * changed / n, "model_bytes": model_bytes,
            "native": kernels.using_native(), "naive_torch_s": t_naive, "encode_s": te, "encode_first_s": t_enc[0],
            "encode_speedup_vs_naive": t_naive / te, "clone_s": t_clone, "decode_apply_s": td,
            "decode_apply_first_s": t_dec[0], "decode_over_clone": td / t_clone,
            "encode_GBps": model_bytes / te / 1e9, "decode_apply_GBps": model_bytes / td / 1e9,
            "digest_s": t_digest, "digest_GBps": model_bytes / t_digest / 1e9, "wire_bytes": wire,
            "bit_exact": exact, "chain_length": len(chain) - 1}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["size", "trace", "speed", "all"], help="which benchmark to run")
    ap.add_argument("--elements", type=int, default=1 << 26,
                    help="size benchmark: synthetic elements (default 67108864; keep >= 64M)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.6, 1.0, 3.0, 10.0],
                    help="size benchmark: percent changed, one row each (default 0.1 0.6 1 3 10)")
    ap.add_argument("--speed-elements", type=int, default=1 << 28,
                    help="speed benchmark: bf16 elements (default 268435456)")
    ap.add_argument("--repeat", type=int, default=3, help="speed benchmark: repetitions, best kept (default 3)")
    ap.add_argument("--trace", default=str(SCRATCH / "trace.pt"),
                    help="trace benchmark: the trace written by bench/trace.py (default %(default)s)")
    ap.add_argument("--out", metavar="DIR", default=str(SCRATCH),
                    help="write codec.json (merged with an existing one) and codec.txt (this run's output) into DIR "
                         "(default %(default)s; the committed results are bench/results); a path ending in .json "
                         "names the JSON file itself")
    args = ap.parse_args(argv)
    if args.what in ("trace", "all") and not Path(args.trace).is_file():   # before minutes of the other parts
        ap.error(f"no trace at {args.trace}: run `python bench/trace.py` first (it writes {SCRATCH / 'trace.pt'} "
                 "by default), or pass --trace PATH")
    path = Path(args.out) if args.out.endswith(".json") else Path(args.out) / "codec.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with Tee(path.with_suffix(".txt")):
        run(args, path)
        print(f"\nresults written to {path} and {path.with_suffix('.txt')}")


def run(args, path: Path) -> None:
    out = {"machine": machine(), "native": kernels.using_native(), "threads": torch.get_num_threads()}
    print(f"machine: {out['machine']}; native kernels: {out['native']}")
    if args.what in ("size", "all"):
        out["size"] = run_size(args)
        print("\nSize (bytes per changed element, all wire bytes incl. headers; every sparsesync row verified "
              "bit-exact):")
        print_table(out["size"], SIZE_COLS)
    if args.what in ("trace", "all"):
        out["trace"] = run_trace(args)
        print("\nRealistic trace (bench/trace.py):")
        print_table(out["trace"], SIZE_COLS)
    if args.what in ("speed", "all"):
        sp = run_speed(args)
        out["speed"] = sp
        print(f"\nSpeed, {sp['elements']} bf16 elements ({sp['model_bytes'] / 2**20:.0f} MiB) at "
              f"{sp['density_pct']:.2f}% changed; one encoder and one decoder over a chain of {sp['chain_length']} "
              f"updates, best after the first (first: encode {sp['encode_first_s'] * 1e3:.1f} ms, decode+apply "
              f"{sp['decode_apply_first_s'] * 1e3:.1f} ms); baselines best of {args.repeat}:")
        print(f"  naive torch diff+nonzero+gather {sp['naive_torch_s'] * 1e3:8.1f} ms")
        print(f"  sparsesync encode               {sp['encode_s'] * 1e3:8.1f} ms  ({sp['encode_GBps']:.2f} GB/s, "
              f"{sp['encode_speedup_vs_naive']:.2f}x faster than naive)")
        print(f"  dense clone                     {sp['clone_s'] * 1e3:8.1f} ms")
        print(f"  sparsesync decode + apply       {sp['decode_apply_s'] * 1e3:8.1f} ms  ({sp['decode_apply_GBps']:.2f} "
              f"GB/s, {sp['decode_over_clone']:.3f} of clone time)")
        print(f"  state_digest                    {sp['digest_s'] * 1e3:8.1f} ms  ({sp['digest_GBps']:.2f} GB/s)")
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(out)
    path.write_text(json.dumps(old, indent=1))


if __name__ == "__main__":
    main()
