"""GPU benchmark of the format-2 CUDA kernels (sparsesync.kernels_cuda, csrc/device2.cu) on one device.

    python bench/gpu.py                          2e9 bf16 elements (4 GB per copy of the state), densities 0.1/0.6/1/3%
    python bench/gpu.py --elements 2e8 --densities 0.006      smaller / selected runs
    python bench/gpu.py --out DIR --budget 200   results under DIR, stop starting new sections after 200 s

A synthetic bf16 state (--tensors tensors of randn * 0.02 making up --elements elements, views of one buffer) and, per
density, an update that changes that fraction of the elements (random positions, +-1..4 ulp). Timed with CUDA events
(best of --repeat, after one warm-up):
- encode: scan2 (diff, block counts, histogram, positions by CUB compaction) + encode2 of each segment with the
  changed positions (chunk coding on the device, segment bytes copied to the host) + the snapshot update (update_old);
  order-0 coding (no classes), chunks of 2^log2c with log2c = round(log2(4096 / density)) as sparsesync.plan2 does,
  segments of --segment elements;
- decode + apply: decode2 of every segment into device staging, then scatter2 into the receiver's state;
- state_digest-like: tree64_many over the state's tensors;
- baselines on the same data: the naive PyTorch path (`!=` on int16 views, `nonzero`, gather of the new values, int32
  cast of the positions, per tensor) and a device-to-device copy of the state.
Model bytes per second count 2 bytes per bf16 element of the state. Extra device memory (peak allocated above what
the state buffers hold) is reported for encode and for decode + apply. Byte identity: on a sample of the state
(--sample elements, copied to the host) the GPU segments equal the CPU encoder's (sparsesync._native) byte for byte
and decode on the CPU to the new state.

- the API (section "api"): ``Encoder`` / ``Decoder`` on CUDA tensors end to end (--api-elements elements in
  --api-tensors tensors at 0.6% changed, the encoder choosing context coding by size), wall-clock times, extra device
  memory, and the buckets compared with a CPU ``Encoder``'s on the host copy of the same states.

Writes gpu.json and gpu.txt (what was printed) to --out, default $OUT when set, else bench/results/gpu-<date>/ (a new
folder; committed results are never overwritten).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sparsesync import _native, kernels_cuda  # noqa: E402
from sparsesync.format import build_freq  # noqa: E402
from sparsesync.space import Space  # noqa: E402

LINES: list[str] = []
IMPL = kernels_cuda  # --cpu-selfcheck: _native on the host (a check of this script on a machine without a GPU)
CUDA = True


def say(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)


def out_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    base = ROOT / "bench" / "results" / f"gpu-{_dt.date.today().isoformat()}"
    p, i = base, 1
    while p.exists():
        i += 1
        p = base.with_name(f"{base.name}-{i}")
    return p


class Timer:
    def __init__(self, repeat: int):
        self.repeat = repeat

    def best(self, fn, setup=None) -> float:
        """Best time (ms) of fn over repeat runs after one warm-up (CUDA events); setup() runs untimed before each."""
        times = []
        for r in range(self.repeat + 1):
            if setup is not None:
                setup()
            if not CUDA:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            if r:
                times.append(a.elapsed_time(b))
        return min(times)


def split_sizes(n: int, t: int) -> list[int]:
    base = n // t
    sizes = [base] * t
    sizes[-1] += n - base * t
    return sizes


def space_of(flat: torch.Tensor, sizes: list[int]) -> Space:
    parts = list(flat.split(sizes))
    return Space("bfloat16", [f"layer{i:04d}" for i in range(len(parts))], parts)


def log2c_for(density: float) -> int:
    return max(12, min(30, int(round(math.log2(4096 / density))) if density < 1 else 12))


def plan_segments(n: int, seg: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + seg)) for s in range(0, n, seg)]


def encode_all(snap: Space, new: Space, log2c: int, seg: int, impl=None, update_old=True):
    """scan + encode of every segment (order 0): [(start, end, table, data, ks, vh, nch)], freqs, total."""
    impl = impl or IMPL
    counts, hist, keys, total, pieces, idx = impl.scan2(snap, new, 0, positions=True)
    freqs = build_freq(hist.sum(0)).reshape(1, 256) if total else np.zeros((1, 256), np.uint32)
    segs = []
    for s, e in plan_segments(snap.n, seg):
        if idx is not None:
            a, b = int(torch.searchsorted(idx, s)), int(torch.searchsorted(idx, e))
            pos = idx[a:b]
        else:
            pos = None
        if pos is not None and pos.numel() == 0:
            continue
        tbl, data, ks, vh, nch = impl.encode2(snap, new, 0, s, e, log2c, [], freqs, update_old=update_old,
                                              positions=pos)
        if nch:
            segs.append((s, e, tbl, data, ks, vh, nch))
    return segs, freqs, total


def wire_segments(segs):
    """(start, end, segment bytes, table length, ks, values hash, count) as a receiver gets them."""
    return [(s, e, tbl + data, len(tbl), ks, vh, nch) for s, e, tbl, data, ks, vh, nch in segs]


def decode_apply(dst: Space, wsegs, freqs, log2c: int, impl=None):
    impl = impl or IMPL
    for s, e, seg, tlen, ks, vh, nch in wsegs:
        idx, vals = impl.decode2(seg, tlen, dst, 0, s, e, log2c, [], ks, freqs, nch, vh)
        impl.scatter2(dst, idx, vals)


def naive(old_parts, new_parts):
    out = []
    for o, n in zip(old_parts, new_parts):
        oi, ni = o.view(torch.int16), n.view(torch.int16)
        pos = (oi != ni).nonzero().squeeze(1)
        out.append((pos.to(torch.int32), ni[pos]))
    return out


def api_section(args, timer: Timer, dev, g) -> dict:
    """Encoder / Decoder on device tensors, against a CPU Encoder on the same states."""
    import sparsesync as ss
    n = int(args.api_elements)
    sizes = split_sizes(n, args.api_tensors)
    names = [f"model.layers.{i:05d}.weight" for i in range(len(sizes))]
    base = (torch.randn(n, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    k = int(n * 0.006)
    newf = base.clone()
    pos = torch.randint(0, n, (k,), generator=g, device=dev)
    newf.view(torch.int16)[pos] += torch.randint(1, 3, (k,), generator=g, device=dev, dtype=torch.int16)
    del pos
    s0 = dict(zip(names, base.split(sizes)))
    s1 = dict(zip(names, newf.split(sizes)))
    r: dict = {"elements": n, "tensors": len(sizes), "changed_target": k}

    def sync():
        if CUDA:
            torch.cuda.synchronize()

    enc_box = {}

    def setup():
        enc_box["enc"] = ss.Encoder(s0, 0, digest=False)
        sync()

    def run_enc():
        enc_box["u"] = enc_box["enc"].encode(s1, version=1)
        sync()

    times = []
    for i in range(args.repeat + 1):
        setup()
        if CUDA:
            torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) if CUDA else 0
        t0 = time.perf_counter()
        run_enc()
        dt = (time.perf_counter() - t0) * 1e3
        if i:
            times.append(dt)
        extra = (torch.cuda.max_memory_allocated(dev) - before) if CUDA else 0
    u = enc_box["u"]
    r.update({"encode_ms": min(times), "encode_model_GBps": 2 * n / (min(times) * 1e-3) / 1e9,
              "encode_extra_bytes": extra, "encode_extra_frac": extra / (2 * n), "wire_bytes": u.stats.wire_bytes,
              "changed": u.stats.changed, "bytes_per_changed": u.stats.bytes_per_changed})
    say(f"[api] Encoder on {dev}: {n:,} bf16 elements in {len(sizes)} tensors, {u.stats.changed:,} changed: encode "
        f"{min(times):.1f} ms ({r['encode_model_GBps']:.0f} GB/s of model bytes), {u.stats.bytes_per_changed:.3f} "
        f"B/changed, extra device memory {extra / 1e6:.0f} MB ({100 * extra / (2 * n):.2f}% of the state)")
    # decode + apply on the device
    recv = base.clone()
    rs = dict(zip(names, recv.split(sizes)))
    dts = []
    for i in range(args.repeat + 1):
        recv.copy_(base)
        dec = ss.Decoder(rs, 0)
        sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) if CUDA else 0
        t0 = time.perf_counter()
        dec.apply(u)
        sync()
        if i:
            dts.append((time.perf_counter() - t0) * 1e3)
        dextra = (torch.cuda.max_memory_allocated(dev) - before) if CUDA else 0
    ok = bool(torch.equal(recv.view(torch.int16), newf.view(torch.int16)))
    r.update({"decode_apply_ms": min(dts), "decode_extra_bytes": dextra, "decode_extra_frac": dextra / (2 * n),
              "decoded_equal": ok})
    say(f"[api] Decoder on {dev}: decode + apply {min(dts):.1f} ms, extra device memory {dextra / 1e6:.0f} MB "
        f"({100 * dextra / (2 * n):.2f}%); state equal to the new one: {ok}")
    # the snapshot in pinned host memory (snapshot="pinned"): the kernels read it across PCIe
    try:
        pe = ss.Encoder(s0, 0, digest=False, snapshot="pinned")
        sync()
        t0 = time.perf_counter()
        pu = pe.encode(s1, version=1)
        sync()
        p_ms = (time.perf_counter() - t0) * 1e3
        r.update({"pinned_encode_ms": p_ms, "pinned_snapshot_host_bytes": pu.stats.snapshot_host_bytes,
                  "pinned_buckets_equal": pu.buckets == u.buckets})
        gb = pu.stats.snapshot_host_bytes / 1e9
        say(f"[api] Encoder(snapshot='pinned'): encode {p_ms:.1f} ms (first encode), {gb:.2f} GB of the pinned "
            f"snapshot covered by the kernels; buckets equal to the device encoder's: {pu.buckets == u.buckets}")
        del pe, pu
    except Exception as exc:  # reported, the section goes on
        r["pinned_error"] = repr(exc)
        say(f"[api] Encoder(snapshot='pinned') failed: {exc!r}")
    # the CPU encoder on host copies: the same bytes
    h0 = {k_: v.cpu() for k_, v in s0.items()}
    h1 = {k_: v.cpu() for k_, v in s1.items()}
    t0 = time.perf_counter()
    hu = ss.Encoder(h0, 0, digest=False).encode(h1, version=1)
    cpu_ms = (time.perf_counter() - t0) * 1e3
    same = hu.buckets == u.buckets
    r.update({"cpu_encode_ms": cpu_ms, "buckets_equal_cpu": bool(same)})
    say(f"[api] CPU Encoder on the host copy: {cpu_ms:.0f} ms; buckets byte-identical to the GPU Encoder's: {same}")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=float, default=2e9)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--densities", default="0.001,0.006,0.01,0.03")
    ap.add_argument("--segment", type=float, default=float(1 << 28), help="elements per sparse segment")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sample", type=float, default=2e7, help="elements checked byte for byte against the CPU")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds: no new section starts after this")
    ap.add_argument("--api-elements", type=float, default=5e8, help="elements of the Encoder/Decoder section")
    ap.add_argument("--api-tensors", type=int, default=4096)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-selfcheck", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global IMPL, CUDA
    if args.cpu_selfcheck:
        IMPL, CUDA = _native, False
    t_start = time.monotonic()
    out = out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
                 "sections": {}, "errors": [], "skipped": []}

    def left() -> float:
        return args.budget - (time.monotonic() - t_start)

    def save() -> None:  # after every section: a run stopped by an outer timeout keeps what it measured
        res["wall_s"] = round(time.monotonic() - t_start, 1)
        (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        (out / "gpu.txt").write_text("\n".join(LINES) + "\n")

    def finish(code: int) -> int:
        save()
        print(f"results: {out / 'gpu.json'}", flush=True)
        return code

    if CUDA and not kernels_cuda.available():
        say(f"CUDA kernels unavailable: {kernels_cuda.unavailable_reason()}")
        res["errors"].append(kernels_cuda.unavailable_reason())
        return finish(2)
    dev = torch.device("cuda" if CUDA else "cpu")
    if CUDA:
        props = torch.cuda.get_device_properties(dev)
        name, sms, mem = props.name, props.multi_processor_count, props.total_memory
    else:
        name, sms, mem = "cpu (selfcheck)", 0, 0
    res["device"] = {"name": name, "sms": sms, "memory_gb": mem / 1e9, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "lib": _native.path}
    n = int(args.elements)
    sizes = split_sizes(n, args.tensors)
    seg = int(args.segment)
    timer = Timer(args.repeat)
    model_bytes = 2 * n
    say(f"device {name} ({sms} SMs, {mem / 1e9:.0f} GB); state: {n:,} bf16 "
        f"elements in {args.tensors} tensors ({model_bytes / 1e9:.2f} GB); segments of {seg:,}")
    g = torch.Generator(device=dev).manual_seed(1)
    # the state: pristine old, the encoder's snapshot, the new state, the receiver's state
    old = torch.empty(n, dtype=torch.bfloat16, device=dev)
    step = 1 << 28
    for s in range(0, n, step):
        e = min(n, s + step)
        old[s:e] = (torch.randn(e - s, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    snap, new, recv = torch.empty_like(old), torch.empty_like(old), torch.empty_like(old)
    base_alloc = torch.cuda.memory_allocated(dev) if CUDA else 0

    def reset_peak():
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)

    def peak_extra() -> int:
        return torch.cuda.max_memory_allocated(dev) - base_alloc if CUDA else 0
    old_sp = space_of(old, sizes)
    snap_sp, new_sp, recv_sp = space_of(snap, sizes), space_of(new, sizes), space_of(recv, sizes)

    def gbps(ms: float, nbytes: float = model_bytes) -> float:
        return nbytes / (ms * 1e-3) / 1e9

    # ---- baseline: device copy
    try:
        ms = timer.best(lambda: snap.copy_(old))
        res["sections"]["copy"] = {"ms": ms, "model_GBps": gbps(ms), "traffic_GBps": gbps(ms, 2 * model_bytes)}
        say(f"device copy: {ms:.2f} ms = {gbps(ms):.0f} GB/s of model bytes ({gbps(ms, 2 * model_bytes):.0f} GB/s "
            "read + write)")
    except Exception as exc:
        res["errors"].append(f"copy: {exc!r}")
        say(traceback.format_exc())
    # ---- digest (tree64 of every tensor)
    try:
        parts = list(old.split(sizes))
        ms = timer.best(lambda: IMPL.tree64_many(parts))
        res["sections"]["tree64_many"] = {"ms": ms, "model_GBps": gbps(ms)}
        say(f"tree64_many (state_digest leaves + tops): {ms:.2f} ms = {gbps(ms):.0f} GB/s of model bytes")
        k = min(n, int(args.sample))
        sample = parts[0][: min(parts[0].numel(), k)]
        same = bool(np.array_equal(IMPL.tree64_many([sample]), _native.tree64_many([sample.cpu()])))
        res["sections"]["tree64_many"]["sample_equal_cpu"] = same
        say(f"  tree64 of a {sample.numel():,}-element sample equals the CPU's: {same}")
    except Exception as exc:
        res["errors"].append(f"tree64: {exc!r}")
        say(traceback.format_exc())
    # ---- per density
    for d in [float(x) for x in args.densities.split(",") if x]:
        save()
        if left() < 20:
            res["skipped"].append(f"density {d}: budget")
            say(f"density {d}: skipped (budget)")
            continue
        key = f"{d * 100:g}%"
        r: dict = {}
        res["sections"][key] = r
        try:
            new.copy_(old)
            k = int(n * d)
            pos = torch.randint(0, n, (k,), generator=g, device=dev)
            step_ = torch.randint(1, 5, (k,), generator=g, device=dev, dtype=torch.int16)
            sign = torch.randint(0, 2, (k,), generator=g, device=dev, dtype=torch.int16) * 2 - 1
            nv = new.view(torch.int16)
            nv[pos] = old.view(torch.int16)[pos] + step_ * sign
            del pos, step_, sign
            log2c = log2c_for(d)
            r["log2c"] = log2c
            # encode
            reset_peak()
            holder = {}

            def enc():
                holder["segs"] = encode_all(snap_sp, new_sp, log2c, seg)

            ms = timer.best(enc, setup=lambda: snap.copy_(old))
            extra = peak_extra()
            segs, freqs, total = holder["segs"]
            wire = sum(len(t) + len(dd) for _, _, t, dd, *_ in segs)
            snap_ok = bool(torch.equal(snap.view(torch.int16), new.view(torch.int16)))
            r.update({"changed": total, "segments": len(segs), "wire_bytes": wire, "bits_per_change":
                      8 * wire / max(1, total), "encode_ms": ms, "encode_model_GBps": gbps(ms),
                      "encode_extra_bytes": extra, "encode_extra_frac": extra / model_bytes,
                      "snapshot_updated": snap_ok})
            say(f"[{key}] {total:,} changed, log2c {log2c}, {len(segs)} segments, {wire:,} wire bytes "
                f"({8 * wire / max(1, total):.2f} bits/change)")
            say(f"  encode (scan + compaction + coding + snapshot update): {ms:.2f} ms = {gbps(ms):.0f} GB/s of "
                f"model bytes; extra memory {extra / 1e6:.0f} MB ({100 * extra / model_bytes:.2f}% of the state); "
                f"snapshot updated: {snap_ok}")
            # scan alone
            ms_scan = timer.best(lambda: IMPL.scan2(old_sp, new_sp, 0, positions=True))
            r.update({"scan_ms": ms_scan, "scan_model_GBps": gbps(ms_scan)})
            say(f"  scan2 with positions alone: {ms_scan:.2f} ms = {gbps(ms_scan):.0f} GB/s")
            # decode + apply
            reset_peak()
            wsegs = wire_segments(segs)
            ms = timer.best(lambda: decode_apply(recv_sp, wsegs, freqs, log2c), setup=lambda: recv.copy_(old))
            extra = peak_extra()
            ok = bool(torch.equal(recv.view(torch.int16), new.view(torch.int16)))
            r.update({"decode_apply_ms": ms, "decode_apply_model_GBps": gbps(ms), "decode_extra_bytes": extra,
                      "decode_extra_frac": extra / model_bytes, "applied_state_equal": ok})
            say(f"  decode + apply: {ms:.2f} ms; extra memory {extra / 1e6:.0f} MB; state equal to new: {ok}")
            # naive PyTorch path
            op, np_ = list(old.split(sizes)), list(new.split(sizes))
            ms = timer.best(lambda: naive(op, np_))
            r.update({"naive_ms": ms, "naive_model_GBps": gbps(ms)})
            say(f"  naive PyTorch (!=, nonzero, gather, int32): {ms:.2f} ms = {gbps(ms):.0f} GB/s")
            if "copy" in res["sections"]:
                c = res["sections"]["copy"]["ms"]
                r["encode_vs_copy"] = r["encode_ms"] / c
                say(f"  encode / device copy: {r['encode_ms'] / c:.2f}x; naive / copy: {ms / c:.2f}x")
            # byte identity on a sample: the first tensors up to --sample elements, on the host
            if left() > 15:
                m = 0
                cnt = 0
                for s_ in sizes:
                    if m + s_ > args.sample and cnt:
                        break
                    m += s_
                    cnt += 1
                m = min(m, int(args.sample))
                ssz = split_sizes(m, cnt)
                o_c, n_c = old[:m].cpu(), new[:m].cpu()
                o_g, n_g = old[:m].clone(), new[:m]
                ocs, ncs = space_of(o_c, ssz), space_of(n_c, ssz)
                ogs, ngs = space_of(o_g, ssz), space_of(n_g, ssz)
                sseg = max(1 << 20, m // 3)
                gs, gf, _ = encode_all(ogs, ngs, log2c, sseg, update_old=False)
                cs, cf, _ = encode_all(ocs, ncs, log2c, sseg, impl=_native, update_old=False)
                ident = np.array_equal(gf, cf) and [x[2:] for x in gs] == [x[2:] for x in cs]
                # GPU segments decode on the CPU to the new state
                rc = o_c.clone()
                decode_apply(space_of(rc, ssz), wire_segments(gs), gf, log2c, impl=_native)
                cross = bool(torch.equal(rc.view(torch.int16), n_c.view(torch.int16)))
                r.update({"sample_elements": m, "sample_segments": len(gs), "gpu_cpu_bytes_identical": bool(ident),
                          "gpu_segments_decode_on_cpu": cross})
                say(f"  sample of {m:,} elements, {len(gs)} segments: GPU bytes == CPU bytes: {ident}; GPU segments "
                    f"decoded on the CPU give the new state: {cross}")
                if not (ident and cross):
                    res["errors"].append(f"{key}: sample identity failed")
        except Exception as exc:
            res["errors"].append(f"{key}: {exc!r}")
            say(traceback.format_exc())
    save()
    if left() > 40:
        try:
            del snap, new, recv, snap_sp, new_sp, recv_sp, old_sp, old
            if CUDA:
                torch.cuda.empty_cache()
            res["sections"]["api"] = api_section(args, timer, dev, g)
        except Exception as exc:
            res["errors"].append(f"api: {exc!r}")
            say(traceback.format_exc())
    else:
        res["skipped"].append("api: budget")
    bad = [k for k, v in res["sections"].items() if isinstance(v, dict) and (
        v.get("snapshot_updated") is False or v.get("applied_state_equal") is False
        or v.get("gpu_cpu_bytes_identical") is False or v.get("sample_equal_cpu") is False
        or v.get("buckets_equal_cpu") is False or v.get("decoded_equal") is False
        or v.get("pinned_buckets_equal") is False or "pinned_error" in v)]
    say("")
    say("summary (model bytes per second; ms):")
    for k, v in res["sections"].items():
        if "encode_ms" in v:
            say(f"  {k:>6}: encode {v['encode_ms']:8.2f} ms {v['encode_model_GBps']:7.0f} GB/s | decode+apply "
                f"{v.get('decode_apply_ms', float('nan')):8.2f} ms | naive {v.get('naive_ms', float('nan')):8.2f} ms"
                f" | identical {v.get('gpu_cpu_bytes_identical', v.get('buckets_equal_cpu'))}")
    if bad:
        res["errors"].append(f"correctness failures: {bad}")
    say(f"errors: {res['errors'] or 'none'}; skipped: {res['skipped'] or 'none'}")
    return finish(1 if res["errors"] else 0)


if __name__ == "__main__":
    sys.exit(main())
