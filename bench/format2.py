"""Wire format 2 benchmark: many tensors cost like one (spaces), context coding (base exponent), speed.

    python bench/format2.py                  all three sections (about 3 minutes on a quiet 2-core machine)
    python bench/format2.py layouts          1 tensor vs 20,000 / 100,000 tensors / an LLM-like mix, format 1 vs 2
    python bench/format2.py traces           bench/trace.py's trace and bench/realtrace.py's real-weights trace
    python bench/format2.py speed            encode vs naive torch, order-0 decode vs int32+raw receiver, context
                                             decode vs dense clone, on a 100-tensor real-weights-like update
    python bench/format2.py layouts --scale 0.05      the same at 5% of the sizes (a quick check)

Results go to --out DIR (default: the scratch folder $TMPDIR/sparsesync-bench): format2.json (merged with what is
already there, so runs of single sections add up) and format2.txt (what this run printed). The committed results are
only rewritten when asked: --out bench/results.

Sections
- layouts: 81,920,000 bf16 elements (randn * 0.02) at 1% changed (uniformly random positions; +-1 ulp for 92% of the
  changes, +-2 for 4%, +-3..8 for 3%, +-9..64 for 1%) as 1 tensor and as 20,000 tensors of 4,096; 102,400,000
  elements as 1 tensor and as 100,000 tensors of 1,024; and a mixed layout: 2 embedding-like tensors of 151,936 x
  1,024 and 20,000 small ones (128 to 4,096 elements) against 1 tensor of the same total. The many-tensor and the
  1-tensor states hold the same bytes (the tensors are consecutive pieces of the one tensor), so their bytes compare
  exactly. For format 1 and format 2 (context chosen by the encoder): encode time (one encoder in steady state: it
  encodes base -> new, new -> base, base -> new, ...; best of the base -> new ones), decode + apply time (a fresh
  clone of the base and a fresh Decoder per run, made outside the timed region; best of --repeat), state_digest time,
  and wire bytes per changed element; then each layout's ratios to 1 tensor (targets for format 2 at 20,000 tensors:
  time <= 1.3x, bytes <= 1.05x).
- traces: per step of bench/trace.py's trace (--trace; a small one is made when it is missing) and of
  bench/realtrace.py's trace of real pretrained weights (--realtrace; made when missing): wire bytes per changed
  element of format 1, format 2 order-0 (context=False), format 2 with the encoder's choice (context=None) and
  format 2 with context wherever possible (context=True), against two information bounds:
  * the order-0 bound: per tensor n*H2(k/n) bits for the positions (n elements, k changed), plus the order-0 entropy
    of the step's value symbols of FORMAT.md §4.2 plus their extra bits;
  * the context bound: the same with the base value's exponent e as context: positions sum_e n_e*H2(k_e/n_e) over
    the step's bf16 elements pooled by exponent (what a space-wide context coder can reach), values H(symbol | e)
    plus the extra bits; "ctx bound/t" conditions positions and symbols on tensor and exponent together.
  The target: format 2 (encoder's choice) <= 0.75 of the order-0 bound.
- speed: a 100-tensor real-weights-like state (11 layers of a Qwen3-0.6B-sized decoder plus a norm, 173M bf16
  elements, from fp32 masters; one AdamW-like step at lr 1e-6 rounds to bf16, so smaller weights change more often,
  as in real training): encode vs the naive PyTorch path (``_changed`` of bench/codec.py: nonzero of the diff, gather
  old and new values); decode + apply of order-0 format-2 segments vs the fastest peer receiver (int32 positions +
  raw values, ``index_copy_`` per tensor, int64 conversion of the positions included); decode + apply of context
  segments vs a dense clone of the same state (best of --repeat, and the first one, which faults in fresh pages)
  and vs a dense copy_ into existing tensors.

Times need a quiet machine: with other processes on the cores, multi-threaded copies and kernels slow down many
times over (the load average is printed at the start and the end, with a warning when the machine is busy).

Every update is applied and checked bit-exact (torch.equal of the integer views of every tensor) before anything is
reported; a mismatch aborts the benchmark.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sparsesync as ss  # noqa: E402
from sparsesync import kernels  # noqa: E402
from sparsesync.netbench import SCRATCH, Tee, machine  # noqa: E402
from bench.codec import _changed  # noqa: E402  (the naive PyTorch path of bench/codec.py)

BF16 = torch.bfloat16
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

VARIANTS = {           # label -> Encoder keywords
    "v1": {"format": 1},
    "v2 order-0": {"format": 2, "context": False},
    "v2 auto": {"format": 2, "context": None},
    "v2 context": {"format": 2, "context": True},
}


def _has_format2() -> bool:
    return "format" in inspect.signature(ss.Encoder).parameters


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def ivu(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_INT[t.element_size()])


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def verify(recv: dict, ref: dict, what: str) -> None:
    """torch.equal of the integer views of every tensor; aborts the benchmark on the first difference."""
    if recv.keys() != ref.keys():
        raise SystemExit(f"NOT BIT-EXACT ({what}): names differ — benchmark aborted")
    for k, t in ref.items():
        if not torch.equal(ivu(recv[k]), ivu(t)):
            raise SystemExit(f"NOT BIT-EXACT ({what}): tensor {k!r} differs — benchmark aborted")


def best(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def changed_count(base: dict, new: dict) -> int:
    return sum(int((ivu(base[k]) != ivu(new[k])).sum()) for k in base)


def check_changed(r: dict, k: int, what: str) -> None:
    if r["changed"] != k:
        raise SystemExit(f"WRONG COUNT ({what}): update.stats.changed = {r['changed']}, the states differ in {k} "
                         "elements — benchmark aborted")


def roundtrip(base: dict, new: dict, kw: dict, repeat: int, what: str, timed: bool = True) -> dict:
    """Encode base -> new with an encoder in steady state and apply it to fresh clones of base, checking each.

    One encoder encodes new, base, new, ... (versions 1, 2, 3, ...); the base -> new encodes are timed (best kept,
    the first also reported). Each base -> new update is applied to a fresh clone of base by a fresh Decoder (both
    made outside the timed region) and checked bit-exact."""
    n_runs = repeat if timed else 1
    enc = ss.Encoder(base, 0, **kw)
    ups, t_enc = [], []
    v = 0
    for r in range(n_runs):
        t0 = time.perf_counter()
        up = enc.encode(new, v + 1)
        up.finish()
        t_enc.append(time.perf_counter() - t0)
        ups.append(up)
        v += 1
        if r < n_runs - 1:
            enc.encode(base, v + 1).finish()
            v += 1
    del enc
    t_dec, split = [], []
    for up in ups:
        recv = clone_state(base)
        dec = ss.Decoder(recv, up.base_version)
        gc.collect()
        t0 = time.perf_counter()
        dec.apply(up)
        t_dec.append(time.perf_counter() - t0)
        split.append((dec.last_stats.decode_seconds, dec.last_stats.apply_seconds))
        verify(recv, new, what)
        del recv, dec
    stage_s, commit_s = split[t_dec.index(min(t_dec))]
    s = ups[-1].stats
    wires = {u.stats.wire_bytes for u in ups}
    if len(wires) != 1:
        print(f"  note ({what}): wire bytes differ between encodes: {sorted(wires)}", file=sys.stderr)
    return {"wire_bytes": s.wire_bytes, "header_bytes": s.header_bytes, "changed": s.changed,
            "B_per_changed": s.wire_bytes / s.changed if s.changed else None, "buckets": s.buckets,
            "dense_tensors": s.dense_tensors, "encode_s": min(t_enc), "encode_first_s": t_enc[0],
            "decode_apply_s": min(t_dec), "decode_apply_first_s": t_dec[0], "stage_s": stage_s, "commit_s": commit_s,
            "bit_exact": True}


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    print("| " + " | ".join(h for h, _, _ in cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = []
        for _, k, f in cols:
            v = r.get(k)
            cells.append("-" if v is None else format(v, f) if f else str(v))
        print("| " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------------------------------
# synthetic data

def synth_flat(n: int, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat bf16 base (randn * 0.02) and new: ~density of the elements (random positions) changed by a bit-pattern
    delta of +-1 (92%), +-2 (4%), +-3..8 (3%), +-9..64 (1%)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.empty(n, dtype=BF16)
    step = 1 << 24
    for s in range(0, n, step):
        e = min(n, s + step)
        base[s:e] = (torch.randn(e - s, generator=g) * 0.02).to(BF16)
    new = base.clone()
    k = int(round(n * density))
    idx = torch.randint(0, n, (k,), generator=g).unique()
    k = idx.numel()
    u = torch.rand(k, generator=g)
    mag = torch.ones(k, dtype=torch.int32)
    mag[(u >= 0.92) & (u < 0.96)] = 2
    m3 = (u >= 0.96) & (u < 0.99)
    mag[m3] = torch.randint(3, 9, (int(m3.sum()),), generator=g, dtype=torch.int32)
    m9 = u >= 0.99
    mag[m9] = torch.randint(9, 65, (int(m9.sum()),), generator=g, dtype=torch.int32)
    sign = torch.randint(0, 2, (k,), generator=g, dtype=torch.int32) * 2 - 1
    nv = new.view(torch.int16)
    nv[idx] = (nv[idx].to(torch.int32) + mag * sign).to(torch.int16)     # wraps mod 2^16 like the bit patterns
    return base, new


def pieces(flat: torch.Tensor, sizes: list[int], names: list[str], shapes: list | None = None) -> dict:
    """The consecutive pieces of `flat` as a state (views: the same bytes as the 1-tensor state)."""
    assert sum(sizes) == flat.numel()
    views = torch.split(flat, sizes)
    if shapes is None:
        return dict(zip(names, views))
    return {nm: v.view(sh) for nm, v, sh in zip(names, views, shapes)}


def layout_cases(scale: float) -> list[dict]:
    """(label, n, sizes, names, shapes) of the many-tensor layouts; each is compared with 1 tensor of its total."""
    cases = []
    for count, size in ((20_000, 4_096), (100_000, 1_024)):
        c = max(1, int(round(count * scale)))
        cases.append({"label": f"{c:,} x {size:,}", "sizes": [size] * c,
                      "names": [f"layers.{i:06d}.weight" for i in range(c)], "shapes": None})
    # mixed: 2 embedding-like tensors (vocab 151,936 x 1,024) + many small ones (norm / bias / small matrix sizes)
    rows = max(1, int(round(151_936 * scale)))
    nsmall = max(1, int(round(20_000 * scale)))
    g = torch.Generator().manual_seed(7)
    small = torch.tensor([128, 1_024, 2_048, 4_096])[torch.randint(0, 4, (nsmall,), generator=g)].tolist()
    sizes = [rows * 1_024, rows * 1_024] + small
    names = ["model.embed_tokens.weight", "lm_head.weight"] + [f"model.layers.{i // 8:05d}.p{i % 8}.weight"
                                                               for i in range(nsmall)]
    shapes = [(rows, 1_024), (rows, 1_024)] + [(s,) for s in small]
    cases.append({"label": f"mixed: 2 x {rows:,}x1,024 + {nsmall:,} small", "sizes": sizes, "names": names,
                  "shapes": shapes})
    return cases


def run_layouts(args) -> dict:
    fmts = {"v1": VARIANTS["v1"], "v2": {"format": 2, "context": None}}
    rows = []
    for ci, case in enumerate(layout_cases(args.scale)):
        t0 = time.perf_counter()
        n = sum(case["sizes"])
        fb, fn = synth_flat(n, 0.01, seed=10 + ci)
        k_true = changed_count({"w": fb}, {"w": fn})
        states = [(f"1 x {n:,}", {"w": fb}, {"w": fn}, 1),
                  (case["label"], pieces(fb, case["sizes"], case["names"], case["shapes"]),
                   pieces(fn, case["sizes"], case["names"], case["shapes"]), len(case["sizes"]))]
        one = {}
        for lname, base, new, ntens in states:
            t_dig = best(lambda new=new: ss.state_digest(new), args.repeat)
            for fl, kw in fmts.items():
                r = roundtrip(base, new, kw, args.repeat, f"layouts {case['label']} / {lname} / {fl}")
                check_changed(r, k_true, f"layouts {lname} {fl}")
                row = {"case": ci, "layout": lname, "tensors": ntens, "elements": n, "format": fl,
                       "density_pct": 100 * r["changed"] / n, "digest_s": t_dig, **r}
                row["encode_ms"], row["decode_ms"] = 1e3 * r["encode_s"], 1e3 * r["decode_apply_s"]
                row["digest_ms"] = 1e3 * t_dig
                if ntens == 1:
                    one[fl] = row
                else:
                    o = one[fl]
                    row["enc_x1"] = r["encode_s"] / o["encode_s"]
                    row["dec_x1"] = r["decode_apply_s"] / o["decode_apply_s"]
                    row["dig_x1"] = t_dig / o["digest_s"]
                    row["bytes_x1"] = r["wire_bytes"] / o["wire_bytes"]
                rows.append(row)
                print(f"  [{lname} {fl}: {row['B_per_changed']:.3f} B/changed, encode {row['encode_ms']:.1f} ms, "
                      f"decode+apply {row['decode_ms']:.1f} ms]", file=sys.stderr)
        del states, fb, fn
        gc.collect()
        print(f"  [layout {case['label']} done in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    # the target: format 2, the 20,000-tensor layout
    tgt = [r for r in rows if r["case"] == 0 and r["format"] == "v2" and r["tensors"] > 1]
    target = None
    if tgt:
        r = tgt[0]
        target = {"layout": r["layout"], "encode_x1": r["enc_x1"], "decode_apply_x1": r["dec_x1"],
                  "bytes_x1": r["bytes_x1"],
                  "time_ok": r["enc_x1"] <= 1.3 and r["dec_x1"] <= 1.3, "bytes_ok": r["bytes_x1"] <= 1.05}
    return {"rows": rows, "target_20000": target}


LAYOUT_COLS = [("layout", "layout", ""), ("tensors", "tensors", ",d"), ("changed %", "density_pct", ".3f"),
               ("format", "format", ""), ("encode ms", "encode_ms", ".1f"), ("decode+apply ms", "decode_ms", ".1f"),
               ("state_digest ms", "digest_ms", ".1f"), ("B/changed", "B_per_changed", ".4f"),
               ("encode x1T", "enc_x1", ".2f"), ("decode x1T", "dec_x1", ".2f"), ("digest x1T", "dig_x1", ".2f"),
               ("bytes x1T", "bytes_x1", ".4f")]


# ---------------------------------------------------------------------------------------------------------------------
# traces and bounds

def _h2(p: torch.Tensor) -> torch.Tensor:
    """Binary entropy in bits (0 at p = 0 or 1), float64."""
    p = p.double()
    q = 1 - p
    return -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
             + torch.where(q > 0, q * torch.log2(q.clamp_min(1e-300)), torch.zeros_like(p)))


def _entropy_bits(counts: torch.Tensor) -> float:
    """Total bits of an i.i.d. code of the counted symbols: sum c * log2(total / c)."""
    c = counts.double()
    c = c[c > 0]
    tot = float(c.sum())
    return float((c * torch.log2(tot / c)).sum()) if tot else 0.0


def delta_symbols(o: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FORMAT.md §4.2 ("delta", 16-bit elements): value symbol and number of extra bits of each changed element,
    from int16 old / new bit patterns of changed elements only."""
    d = (n.to(torch.int32) - o.to(torch.int32)) & 0xFFFF
    d = torch.where(d >= 0x8000, d - 0x10000, d)
    neg = (d < 0).to(torch.int64)
    m = d.abs().to(torch.int64)                     # 1 .. 32768
    nb = torch.zeros_like(m)
    for j in range(17):
        nb += ((m >> j) != 0).to(torch.int64)
    small = m <= 8
    sym = torch.where(small, 2 * (m - 1) + neg, 16 + nb - 4)
    extra = torch.where(small, torch.zeros_like(nb), nb)     # sign bit + the low nb-1 bits of m
    return sym, extra


def bounds(base: dict, new: dict) -> dict:
    """Order-0 and exponent-context information bounds (bits) of one step; bf16 / fp16 tensors (2-byte floats).

    Keys: bf16 -> 8 exponent bits (x >> 7) & 255, float16 -> 5 bits (x >> 10) & 31: FORMAT.md §6.3."""
    pos0 = 0.0
    pos_te = 0.0
    n_e = torch.zeros(256, dtype=torch.float64)
    k_e = torch.zeros(256, dtype=torch.float64)
    syms, keys, tkeys = [], [], []
    extra = 0
    changed = 0
    for ti, (name, bt) in enumerate(base.items()):
        if bt.element_size() != 2 or not bt.is_floating_point():
            raise SystemExit(f"bounds: tensor {name!r} is {bt.dtype}; only 2-byte floats are handled")
        shift, kmask = (7, 0xFF) if bt.dtype == BF16 else (10, 0x1F)
        o = ivu(bt)
        nw = ivu(new[name])
        mask = o != nw
        k = int(mask.sum())
        nn = o.numel()
        changed += k
        if 0 < k < nn:
            pos0 += nn * float(_h2(torch.tensor(k / nn)))
        key = (o.to(torch.int32) >> shift) & kmask
        ne = torch.bincount(key, minlength=256).double()
        kc = key[mask]
        ke = torch.bincount(kc, minlength=256).double()
        n_e += ne
        k_e += ke
        nz = ne > 0
        pos_te += float((ne[nz] * _h2(ke[nz] / ne[nz])).sum())
        if k:
            s, x = delta_symbols(o[mask], nw[mask])
            syms.append(s)
            keys.append(kc.to(torch.int64))
            tkeys.append(torch.full((k,), ti, dtype=torch.int64))
            extra += int(x.sum())
    if not changed:
        return {"changed": 0}
    sym = torch.cat(syms)
    key = torch.cat(keys)
    tk = torch.cat(tkeys)
    val0 = _entropy_bits(torch.bincount(sym))
    # conditional entropy H(S|E) * K = sum_e K_e * H(S | E = e): the entropy of the joint counts minus that of E
    joint = torch.bincount(key * 64 + sym)
    val_e = _entropy_bits(joint) - _entropy_bits(torch.bincount(key))
    jt = (tk * 256 + key) * 64 + sym
    val_te = _entropy_bits(torch.unique(jt, return_counts=True)[1]) - \
        _entropy_bits(torch.unique(tk * 256 + key, return_counts=True)[1])
    nz = n_e > 0
    pos_e = float((n_e[nz] * _h2(k_e[nz] / n_e[nz])).sum())
    return {"changed": changed, "extra_bits": extra,
            "order0_pos_bits": pos0, "order0_val_bits": val0 + extra,
            "ctx_pos_bits": pos_e, "ctx_val_bits": val_e + extra,
            "ctx_t_pos_bits": pos_te, "ctx_t_val_bits": val_te + extra,
            "order0_B": (pos0 + val0 + extra) / 8 / changed,
            "ctx_B": (pos_e + val_e + extra) / 8 / changed,
            "ctx_t_B": (pos_te + val_te + extra) / 8 / changed}


def _load(path: str) -> dict:
    tr = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tr, dict) or "steps" not in tr:
        raise SystemExit(f"{path}: not a sparsesync bench trace")
    return tr


def get_traces(args) -> list[tuple[str, dict]]:
    from bench.trace import make_trace, save_trace
    out = []
    p = Path(args.trace)
    if p.is_file():
        out.append((f"trace.py ({p.name})", _load(str(p))))
    else:
        small = SCRATCH / "trace-small.pt"
        if small.is_file():
            print(f"  [no trace at {p}: using the small one at {small}]", file=sys.stderr)
        else:
            print(f"  [no trace at {p}: making a small one (4 layers, hidden 256, 4 steps) at {small}; "
                  "`python bench/trace.py` makes the full one]", file=sys.stderr)
            save_trace(make_trace(layers=4, hidden=256, steps=4, warmup_steps=20, verbose=False), str(small))
        out.append(("trace.py small", _load(str(small))))
    rp = Path(args.realtrace)
    if not rp.is_file():
        from bench.realtrace import make_realtrace
        print(f"  [no real-weights trace at {rp}: making it (bench/realtrace.py, about 40 s)]", file=sys.stderr)
        save_trace(make_realtrace(verbose=False), str(rp))
    out.append((f"realtrace ({rp.name})", _load(str(rp))))
    return out


def run_traces(args) -> list[dict]:
    """Each variant runs the trace as a trainer would: one Encoder and one Decoder over the whole chain of steps
    (steady state: the encoder plans each update with what the last one taught it), every step verified bit-exact."""
    rows = []
    for tname, tr in get_traces(args):
        steps = tr["steps"]
        last = len(steps) if args.trace_steps is None else min(len(steps), args.trace_steps + 1)
        encs = {vl: ss.Encoder(steps[0], 0, **kw) for vl, kw in VARIANTS.items()}
        recvs = {vl: clone_state(steps[0]) for vl in VARIANTS}
        decs = {vl: ss.Decoder(recvs[vl], 0) for vl in VARIANTS}
        for i in range(1, last):
            t0 = time.perf_counter()
            base, new = steps[i - 1], steps[i]
            b = bounds(base, new)
            n = sum(t.numel() for t in base.values())
            row = {"trace": tname, "step": i, "elements": n, "tensors": len(base), "changed": b["changed"],
                   "density_pct": 100 * b["changed"] / n, "bounds": b,
                   "order0_B": b.get("order0_B"), "ctx_B": b.get("ctx_B"), "ctx_t_B": b.get("ctx_t_B")}
            for vl in VARIANTS:
                up = encs[vl].encode(new, i)
                decs[vl].apply(up)
                verify(recvs[vl], new, f"traces {tname} step {i} {vl}")
                check_changed({"changed": up.stats.changed}, b["changed"], f"traces {tname} step {i} {vl}")
                row[vl] = up.stats.wire_bytes / up.stats.changed
                row[vl + " wire_bytes"] = up.stats.wire_bytes
            if row["order0_B"]:
                for vl in VARIANTS:
                    row[vl + "/bound"] = row[vl] / row["order0_B"]
            rows.append(row)
            print(f"  [{tname} step {i}: {row['density_pct']:.3f}% changed, v2 auto {row['v2 auto']:.3f} B "
                  f"= {row.get('v2 auto/bound', float('nan')):.3f} x order-0 bound "
                  f"({time.perf_counter() - t0:.1f}s)]", file=sys.stderr)
    return rows


TRACE_COLS = [("trace", "trace", ""), ("step", "step", "d"), ("changed %", "density_pct", ".3f"),
              ("v1 B", "v1", ".3f"), ("v2 order-0 B", "v2 order-0", ".3f"), ("v2 auto B", "v2 auto", ".3f"),
              ("v2 context B", "v2 context", ".3f"), ("order-0 bound B", "order0_B", ".3f"),
              ("ctx bound B", "ctx_B", ".3f"), ("ctx bound/t B", "ctx_t_B", ".3f"),
              ("v1/bound", "v1/bound", ".3f"), ("v2 auto/bound", "v2 auto/bound", ".3f"),
              ("v2 ctx/bound", "v2 context/bound", ".3f")]


# ---------------------------------------------------------------------------------------------------------------------
# speed

def qwen_like(scale: float, seed: int = 3, lr: float = 1e-6, ratio_std: float = 0.15) -> tuple[dict, dict]:
    """100 tensors: 11 layers of a Qwen3-0.6B-sized decoder (q 2048x1024, k/v 1024x1024, o 1024x2048, gate/up
    3072x1024, down 1024x3072, 2 norms of 1024) and a final norm. fp32 masters (matrices N(0, 0.02^2) with a per-row
    scale in [0.5, 2], norms 1 + N(0, 0.05^2)); the new state adds lr * r with r ~ N(0, 1) (an Adam update direction)
    and rounds both to bf16, so the changes are those of real training (more frequent where the ulp is small)."""
    g = torch.Generator().manual_seed(seed)
    h = max(64, int(round(1024 * math.sqrt(scale)) // 64 * 64))
    shapes = {"q_proj": (2 * h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, 2 * h),
              "gate_proj": (3 * h, h), "up_proj": (3 * h, h), "down_proj": (h, 3 * h),
              "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    base, new = {}, {}

    def add(name, shape, norm):
        if norm:
            w = 1 + 0.05 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) * 0.02
            w *= torch.exp2(torch.rand(shape[0], 1, generator=g) * 2 - 1)
        base[name] = w.to(BF16)
        w += lr * ratio_std * torch.randn(shape, generator=g)
        new[name] = w.to(BF16)
    for layer in range(11):
        for part, shape in shapes.items():
            add(f"model.layers.{layer}.{part}.weight", shape, len(shape) == 1)
    add("model.norm.weight", (h,), True)
    return base, new


def run_speed(args) -> dict:
    t0 = time.perf_counter()
    base, new = qwen_like(args.scale)
    n = sum(t.numel() for t in base.values())
    k = changed_count(base, new)
    print(f"  [speed state: {len(base)} tensors, {n:,} elements, {100 * k / n:.3f}% changed, made in "
          f"{time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    model_bytes = 2 * n
    rep = args.repeat
    out = {"tensors": len(base), "elements": n, "changed": k, "density_pct": 100 * k / n, "model_bytes": model_bytes}

    olds, news = list(base.values()), list(new.values())

    def naive():
        for o, nw in zip(olds, news):
            _changed(o, nw)
    out["naive_s"] = best(naive, rep)
    # a dense clone: the first one of the process faults in fresh pages; later ones reuse freed heap memory (the
    # tensors are below glibc's mmap threshold), so both are kept; and the dense overwrite of existing tensors
    t_clone = []
    for _ in range(rep):
        gc.collect()
        ts = time.perf_counter()
        cl = [t.clone() for t in news]
        t_clone.append(time.perf_counter() - ts)
        del cl
    out["clone_first_s"], out["clone_s"] = t_clone[0], min(t_clone)
    dst = [t.clone() for t in olds]
    out["copy_s"] = best(lambda: [d.copy_(t) for d, t in zip(dst, news)], rep)
    dst = None

    # peer receiver: int32 positions + raw values per tensor, applied with index_copy_ (positions to int64 included)
    msgs = []
    for o, nw in zip(olds, news):
        idx, _, nv = _changed(o, nw)
        msgs.append((idx.to(torch.int32), nv.view(BF16)))
    out["peer_B_per_changed"] = sum(i.numel() * 4 + v.numel() * 2 for i, v in msgs) / k
    t_peer = []
    for _ in range(rep):
        recv = [t.clone() for t in olds]
        gc.collect()
        ts = time.perf_counter()
        for t, (idx, vals) in zip(recv, msgs):
            t.view(-1).index_copy_(0, idx.to(torch.int64), vals)
        t_peer.append(time.perf_counter() - ts)
        verify(dict(zip(base, recv)), new, "speed: int32+raw peer receiver")
        del recv
    out["peer_apply_s"] = min(t_peer)

    out["variants"] = {}
    for vl, kw in VARIANTS.items():
        r = roundtrip(base, new, kw, rep, f"speed {vl}")
        check_changed(r, k, f"speed {vl}")
        out["variants"][vl] = r
        print(f"  [speed {vl}: encode {1e3 * r['encode_s']:.1f} ms, decode+apply {1e3 * r['decode_apply_s']:.1f} ms,"
              f" {r['B_per_changed']:.3f} B/changed]", file=sys.stderr)
    v = out["variants"]
    out["encode_speedup_vs_naive"] = {vl: out["naive_s"] / r["encode_s"] for vl, r in v.items()}
    out["order0_decode_over_peer"] = v["v2 order-0"]["decode_apply_s"] / out["peer_apply_s"]
    out["context_decode_over_clone"] = v["v2 context"]["decode_apply_s"] / out["clone_s"]
    out["auto_decode_over_clone"] = v["v2 auto"]["decode_apply_s"] / out["clone_s"]
    return out


def print_speed(sp: dict, repeat: int) -> None:
    mb = sp["model_bytes"]
    print(f"\nSpeed: {sp['tensors']} tensors, {sp['elements']:,} bf16 elements ({mb / 2**20:.0f} MiB), "
          f"{sp['density_pct']:.3f}% changed (real-weights-like, one step at lr 1e-6); best of {repeat}; encoders in "
          f"steady state, every decode on a fresh clone, all verified bit-exact:")
    rows = [("naive torch: nonzero of diff + gather (bench/codec.py)", sp["naive_s"], "")]
    for vl, r in sp["variants"].items():
        rows.append((f"sparsesync encode, {vl} ({r['B_per_changed']:.3f} B/changed)", r["encode_s"],
                     f"{sp['naive_s'] / r['encode_s']:.2f}x faster than naive"))
    rows.append((f"peer receiver: int32 + raw, index_copy_ ({sp['peer_B_per_changed']:.2f} B/changed)",
                 sp["peer_apply_s"], ""))
    rows.append(("dense clone of the state (best)", sp["clone_s"], ""))
    rows.append(("dense clone of the state (first, fresh pages)", sp["clone_first_s"], ""))
    rows.append(("dense copy_ into the receiver's tensors", sp["copy_s"], ""))
    for vl, r in sp["variants"].items():
        rel = (f"{r['decode_apply_s'] / sp['peer_apply_s']:.2f}x peer, {r['decode_apply_s'] / sp['clone_s']:.3f} of "
               f"clone (best), {r['decode_apply_s'] / sp['copy_s']:.3f} of copy_")
        rows.append((f"sparsesync decode + apply, {vl}", r["decode_apply_s"], rel))
    print("| operation | time ms | model GB/s | relative |")
    print("|---|---|---|---|")
    for label, s, rel in rows:
        print(f"| {label} | {1e3 * s:.1f} | {mb / s / 1e9:.2f} | {rel} |")
    o0 = sp["variants"]["v2 order-0"]
    if "commit_s" in o0:
        print(f"v2 order-0 decode+apply split (fastest run): staging {1e3 * o0['stage_s']:.1f} ms (verify + decode, "
              f"done while buckets arrive in a session) + commit {1e3 * o0['commit_s']:.1f} ms (what the engine waits "
              f"for after the last byte: {o0['commit_s'] / sp['peer_apply_s']:.2f}x the peer's apply)")
    print(f"order-0 decode+apply / peer receiver: {sp['order0_decode_over_peer']:.2f}x;  context decode+apply / "
          f"dense clone: {sp['context_decode_over_clone']:.3f} (first clone: "
          f"{sp['variants']['v2 context']['decode_apply_s'] / sp['clone_first_s']:.3f});  encode (v2 auto) vs naive: "
          f"{sp['encode_speedup_vs_naive']['v2 auto']:.2f}x faster")


# ---------------------------------------------------------------------------------------------------------------------

SECTIONS = ("layouts", "traces", "speed")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", metavar="SECTION",
                    help="sections to run: layouts, traces, speed or all (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions, best kept (default 3)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the element counts of the layouts and speed sections (default 1; e.g. 0.05 for "
                         "a quick check; the targets are meant for 1)")
    ap.add_argument("--trace", default=str(SCRATCH / "trace.pt"),
                    help="trace of bench/trace.py (default %(default)s; when missing a small one is made and kept "
                         f"at {SCRATCH / 'trace-small.pt'})")
    ap.add_argument("--realtrace", default=str(SCRATCH / "realtrace.pt"),
                    help="trace of bench/realtrace.py (default %(default)s; made there when missing)")
    ap.add_argument("--trace-steps", type=int, default=None, help="at most this many steps of each trace")
    ap.add_argument("--out", metavar="DIR", default=str(SCRATCH),
                    help="write format2.json (merged with an existing one) and format2.txt (this run's output) into "
                         "DIR (default %(default)s; the committed results are bench/results); a path ending in .json "
                         "names the JSON file itself")
    args = ap.parse_args(argv)
    bad = [w for w in args.what if w not in (*SECTIONS, "all")]
    if bad:
        ap.error(f"unknown section(s) {bad}: choose from {', '.join(SECTIONS)} or all")
    if not _has_format2():
        ap.error("this sparsesync has no Encoder(format=...): format 2 is not available")
    what = SECTIONS if not args.what or "all" in args.what else [s for s in SECTIONS if s in args.what]
    path = Path(args.out) if args.out.endswith(".json") else Path(args.out) / "format2.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with Tee(path.with_suffix(".txt")):
        run(args, what, path)
        print(f"\nresults written to {path} and {path.with_suffix('.txt')}")


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run(args, what, path: Path) -> None:
    t_all = time.perf_counter()
    out = {"machine": machine(), "native": kernels.using_native(), "threads": torch.get_num_threads(),
           "scale": args.scale, "repeat": args.repeat, "loadavg_start": loadavg()}
    print(f"machine: {out['machine']}; native kernels: {out['native']}; threads {out['threads']}; load average "
          f"{out['loadavg_start']}" + (f"; SCALE {args.scale} (targets are meant for 1)" if args.scale != 1 else ""))
    if (out["loadavg_start"] or 0) > 0.5:
        print("WARNING: the machine is busy (load average above 0.5): times of multi-threaded code (torch's and the "
              "native kernels') can be many times too long when other processes take the cores")
    if "layouts" in what:
        t0 = time.perf_counter()
        lay = run_layouts(args)
        out["layouts"] = lay
        print(f"\nLayouts: the same bf16 elements at 1% changed as 1 tensor and as many; format 2 = context chosen by "
              f"the encoder; encode in steady state and decode + apply on a fresh clone, best of {args.repeat}; "
              f"x1T = ratio to the 1-tensor state of the same bytes; all verified bit-exact "
              f"({time.perf_counter() - t0:.0f}s):")
        print_table(lay["rows"], LAYOUT_COLS)
        t = lay["target_20000"]
        if t:
            print(f"target, format 2 at {t['layout']} tensors vs 1 tensor: encode {t['encode_x1']:.2f}x, decode+apply "
                  f"{t['decode_apply_x1']:.2f}x (<= 1.3: {'met' if t['time_ok'] else 'NOT met'}), bytes "
                  f"{t['bytes_x1']:.4f}x (<= 1.05: {'met' if t['bytes_ok'] else 'NOT met'})")
    if "traces" in what:
        t0 = time.perf_counter()
        tr = run_traces(args)
        out["traces"] = tr
        print(f"\nTraces: wire bytes per changed element (headers included) and information bounds; every update "
              f"verified bit-exact ({time.perf_counter() - t0:.0f}s):")
        print_table(tr, TRACE_COLS)
        ratios = [r["v2 auto/bound"] for r in tr if r.get("v2 auto/bound") is not None]
        if ratios:
            bad = sum(x > 0.75 for x in ratios)
            print(f"v2 auto / order-0 bound: {min(ratios):.3f} .. {max(ratios):.3f} (target <= 0.75: "
                  + ("met on every step)" if not bad else f"NOT met on {bad} of {len(ratios)} steps)"))
    if "speed" in what:
        t0 = time.perf_counter()
        sp = run_speed(args)
        out["speed"] = sp
        print_speed(sp, args.repeat)
        print(f"({time.perf_counter() - t0:.0f}s)")
    out["seconds"] = time.perf_counter() - t_all
    out["loadavg_end"] = loadavg()
    print(f"\ntotal {out['seconds']:.0f}s; load average at the end {out['loadavg_end']}")
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(out)
    path.write_text(json.dumps(old, indent=1))


if __name__ == "__main__":
    main()
