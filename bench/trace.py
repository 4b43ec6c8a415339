"""Realistic weight-update trace for the sparsesync codec benchmark.

Trains a small Llama-style decoder-only transformer (plain torch, CPU) the way RL post-training keeps its weights:
fp32 master weights, AdamW at lr 1e-6, fp32 compute.  After a short warm-up at a large lr (so weights and Adam state
are "trained-like" rather than at init) it snapshots every parameter as bf16 -- what a trainer would broadcast to its
inference engines -- once before and once after each optimizer step.  Consecutive snapshots differ in the few elements
whose fp32 master crossed a bf16 rounding boundary; that sparse difference is what sparsesync codes.

    python bench/trace.py                      # default ~30M params, 8 steps, writes $TMPDIR/sparsesync-bench/trace.pt
    python bench/trace.py --out DIR            # writes DIR/trace.pt (bench/codec.py trace --trace DIR/trace.pt)
    python bench/trace.py --layers 1 --hidden 64 --steps 3 --out /tmp/t.pt    # a path ending in .pt: that file

The default output is the scratch folder that ``bench/codec.py trace`` reads by default, so the two commands work
in a row without options. The default trace is about 550 MiB (9 bf16 snapshots of 32M parameters).

Library use::

    from bench.trace import make_trace, load_trace
    tr = make_trace(layers=1, hidden=64, steps=2, warmup_steps=2, verbose=False)
    tr["steps"][0]["layers.0.attn.q_proj.weight"]     # bf16 tensor

Trace layout (a plain dict, saved with ``torch.save``; loadable with ``weights_only=True``)::

    {"config": asdict(ModelConfig), "lr": float,
     "steps": [ {name: bf16 tensor} for step 0 (after warm-up), 1 (after the first lr-step), ..., S ],
     "meta": {...recipe, timings, per-step loss / change statistics...}}

Data is a seeded synthetic language (a fixed sparse random bigram Markov chain over the vocabulary) so that the loss
actually decreases; everything is seeded and computed in fp32 on CPU, so a run is reproducible for a given torch
version and thread count.

Measured on 2 CPU cores, torch 2.13 (default run, 30-40 s in all): 32.0M params, 0.86-1.2 s/step, 0.35-0.45% of bf16
elements change per lr-step (slowly decreasing over the 8 steps), ~91% of them by +-1 ulp, ~3.7% by +-2, ~3% by more
(near-zero weights, whose ulp is tiny).  The density is explained exactly by
``sum_i min(1, lr * |m_hat_i / sqrt(v_hat_i)| / ulp_bf16(w_i)) / N`` -- the fp32 master sits uniformly inside its
bf16 rounding interval -- with a mean Adam ratio ``|m_hat / sqrt(v_hat)|`` of only ~0.07 here, so the density depends
on the optimizer history (e.g. a 60-step warm-up gives 0.31% rising to 0.62% over 10 lr-steps).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, fields
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = [
    "ModelConfig",
    "LlamaModel",
    "SyntheticLanguage",
    "bf16_snapshot",
    "diff_stats",
    "format_hist",
    "make_trace",
    "save_trace",
    "load_trace",
    "main",
]


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


from sparsesync.models import LlamaModel, ModelConfig, SyntheticLanguage, bf16_snapshot  # noqa: E402
from sparsesync.netbench import SCRATCH  # noqa: E402

DEFAULT_OUT = str(SCRATCH / "trace.pt")      # where bench/codec.py looks for it by default


def _group(name: str) -> str:
    if "norm" in name:
        return "norm"
    if name.startswith("embed_tokens"):
        return "embed"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return "other"


def diff_stats(old: Dict[str, torch.Tensor], new: Dict[str, torch.Tensor], top: int = 8) -> Dict[str, Any]:
    """Bitwise change statistics between two bf16 snapshots.

    Returns total / changed element counts, density, the histogram of int16 bit-pattern differences
    (``new.view(int16) - old.view(int16)``) as a list of ``[delta, count]`` (descending count, all values), and
    per-group (embed / attn / mlp / norm / lm_head) total and changed counts."""
    total = 0
    changed = 0
    deltas: List[torch.Tensor] = []
    groups: Dict[str, List[int]] = {}
    for name, a in old.items():
        b = new[name]
        ai = a.view(torch.int16)
        bi = b.view(torch.int16)
        mask = ai != bi
        n = a.numel()
        c = int(mask.sum())
        total += n
        changed += c
        g = groups.setdefault(_group(name), [0, 0])
        g[0] += n
        g[1] += c
        if c:
            deltas.append(bi[mask].int() - ai[mask].int())
    hist: List[List[int]] = []
    if deltas:
        vals, counts = torch.unique(torch.cat(deltas), return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)
        hist = [[int(vals[i]), int(counts[i])] for i in order.tolist()]
    return {
        "total": total,
        "changed": changed,
        "density": changed / total if total else 0.0,
        "hist": hist,
        "top": top,
        "groups": {k: {"total": v[0], "changed": v[1]} for k, v in sorted(groups.items())},
    }


def format_hist(hist: List[List[int]], top: int = 8, extra_other: int = 0) -> str:
    """Format ``[[delta, count], ...]`` (descending count) as "+1: 45.1% -1: 44.8% ... other: 0.10%".
    `extra_other` adds a count of changes not listed in `hist` to the "other" bucket."""
    n = sum(c for _, c in hist) + extra_other
    if not n:
        return "(no changes)"
    parts = [f"{d:+d}: {100.0 * c / n:.1f}%" for d, c in hist[:top]]
    rest = sum(c for _, c in hist[top:]) + extra_other
    if rest:
        parts.append(f"other: {100.0 * rest / n:.2f}%")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Trace generation
# ----------------------------------------------------------------------------------------------------------------------

_CONFIG_FIELDS = {f.name for f in fields(ModelConfig)}


def make_trace(
    *,
    steps: int = 8,
    lr: float = 1e-6,
    warmup_steps: int = 20,
    warmup_lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple = (0.9, 0.999),
    eps: float = 1e-8,
    batch_size: int = 8,
    seq_len: int = 128,
    branching: int = 4,
    zipf_s: float = 1.1,
    mix: float = 0.1,
    seed: int = 0,
    layers: Optional[int] = None,
    hidden: Optional[int] = None,
    config: Optional[ModelConfig] = None,
    verbose: bool = True,
    log=None,
    **config_overrides: Any,
) -> Dict[str, Any]:
    """Train and return the trace dict (nothing is saved).

    `layers` / `hidden` are shorthands for ``num_layers`` / ``hidden_size``; any other ModelConfig field
    (``vocab_size``, ``intermediate_size``, ``num_heads``, ``num_kv_heads``, ...) can be passed as a keyword, or a
    whole `config`.  ``steps`` lr-steps produce ``steps + 1`` snapshots (index 0 is taken after the warm-up).
    Tiny example (a couple of seconds): ``make_trace(layers=1, hidden=64, steps=2, warmup_steps=2)``."""
    unknown = set(config_overrides) - _CONFIG_FIELDS
    if unknown:
        raise TypeError(f"make_trace: unknown arguments {sorted(unknown)}")
    if config is None:
        kw = dict(config_overrides)
        if layers is not None:
            kw["num_layers"] = layers
        if hidden is not None:
            kw["hidden_size"] = hidden
        kw.setdefault("max_seq_len", max(seq_len, ModelConfig.max_seq_len))
        config = ModelConfig(**kw)
    elif layers is not None or hidden is not None or config_overrides:
        raise TypeError("make_trace: pass either config or individual config fields, not both")
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} > config.max_seq_len {config.max_seq_len}")
    if log is None:
        log = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)

    torch.manual_seed(seed)
    init_gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed + 1)
    lang = SyntheticLanguage(config.vocab_size, branching=branching, zipf_s=zipf_s, mix=mix, seed=seed + 2)

    model = LlamaModel(config, generator=init_gen)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        model.parameters(), lr=warmup_lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=False
    )
    log(
        f"model: {n_params:,} params ({n_params / 1e6:.1f}M)  layers={config.num_layers} hidden={config.hidden_size} "
        f"inter={config.intermediate_size} heads={config.num_heads}/{config.num_kv_heads} vocab={config.vocab_size}  "
        f"batch={batch_size}x{seq_len}  threads={torch.get_num_threads()}  "
        f"(data: unigram entropy {lang.unigram_entropy:.2f} nats, bigram {lang.bigram_entropy:.2f}, "
        f"uniform {math.log(config.vocab_size):.2f})"
    )

    def train_step() -> float:
        toks = lang.batch(batch_size, seq_len + 1, data_gen)
        logits = model(toks[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    warmup_losses: List[float] = []
    for i in range(warmup_steps):
        ts = time.perf_counter()
        warmup_losses.append(train_step())
        log(
            f"[warmup {i + 1}/{warmup_steps}] lr={warmup_lr:g} loss={warmup_losses[-1]:.4f} "
            f"step={time.perf_counter() - ts:.2f}s elapsed={time.perf_counter() - t0:.1f}s"
        )
    warmup_s = time.perf_counter() - t0

    for g in opt.param_groups:
        g["lr"] = lr
    snaps = [bf16_snapshot(model)]
    step_stats: List[Dict[str, Any]] = []
    step_times: List[float] = []
    t1 = time.perf_counter()
    for s in range(1, steps + 1):
        ts = time.perf_counter()
        loss = train_step()
        dt = time.perf_counter() - ts
        step_times.append(dt)
        snaps.append(bf16_snapshot(model))
        st = diff_stats(snaps[-2], snaps[-1])
        st["loss"] = loss
        st["seconds"] = dt
        step_stats.append(st)
        log(
            f"[step {s}/{steps}] lr={lr:g} loss={loss:.4f} elements={st['total']:,} changed={st['changed']:,} "
            f"density={100.0 * st['density']:.4f}%  step={dt:.2f}s elapsed={time.perf_counter() - t0:.1f}s"
        )
        log(f"    delta hist: {format_hist(st['hist'])}")
        log(
            "    by group: "
            + "  ".join(
                f"{k} {100.0 * v['changed'] / max(v['total'], 1):.3f}%" for k, v in st["groups"].items()
            )
        )

    # Keep the stored histogram short (top entries plus the remainder) so meta stays small.
    for st in step_stats:
        h = st["hist"]
        st["hist_other"] = sum(c for _, c in h[32:])
        st["hist"] = h[:32]

    meta = {
        "format": "sparsesync-bench-trace-1",
        "param_count": n_params,
        "param_names": list(snaps[0].keys()),
        "optimizer": {
            "name": "AdamW",
            "lr": lr,
            "betas": list(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "master_dtype": "float32",
            "compute_dtype": "float32",
            "snapshot_dtype": "bfloat16",
        },
        "warmup": {"steps": warmup_steps, "lr": warmup_lr, "losses": warmup_losses, "seconds": warmup_s},
        "data": {
            "kind": "zipf-bigram-markov",
            "branching": branching,
            "zipf_s": zipf_s,
            "mix": mix,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "unigram_entropy_nats": lang.unigram_entropy,
            "bigram_entropy_nats": lang.bigram_entropy,
        },
        "seed": seed,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "seconds_per_step": (sum(step_times) / len(step_times)) if step_times else 0.0,
        "lr_phase_seconds": time.perf_counter() - t1,
        "step_stats": step_stats,  # step_stats[i] compares steps[i] -> steps[i+1]
    }
    return {"config": asdict(config), "lr": lr, "steps": snaps, "meta": meta}


def save_trace(trace: Dict[str, Any], path: str) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(trace, tmp)
    os.replace(tmp, path)


def load_trace(path: str) -> Dict[str, Any]:
    """Load a trace written by this module: {"config", "lr", "steps": [ {name: bf16 tensor}, ... ], "meta"}."""
    tr = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tr, dict) or "steps" not in tr:
        raise ValueError(f"{path}: not a sparsesync bench trace")
    return tr


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="lr-steps after the step-0 snapshot")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate of the traced steps")
    ap.add_argument("--warmup-steps", type=int, default=20, help="steps at --warmup-lr before the first snapshot")
    ap.add_argument("--warmup-lr", type=float, default=1e-3, help="learning rate of the warm-up")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--layers", type=int, default=ModelConfig.num_layers, help="transformer layers")
    ap.add_argument("--hidden", type=int, default=ModelConfig.hidden_size, help="hidden size")
    ap.add_argument("--intermediate", type=int, default=None, help="default: Llama rule from --hidden")
    ap.add_argument("--heads", type=int, default=None, help="default: hidden // 64")
    ap.add_argument("--kv-heads", type=int, default=None, help="default: heads // 2")
    ap.add_argument("--vocab", type=int, default=ModelConfig.vocab_size, help="vocabulary size")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the language")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", metavar="DIR", default=os.path.dirname(DEFAULT_OUT),
                    help="write DIR/trace.pt (bench/codec.py trace reads the default one); a path ending in .pt "
                         "names the file itself")
    a = ap.parse_args(argv)
    if not a.out.endswith(".pt"):
        a.out = os.path.join(a.out, "trace.pt")
    if a.threads:
        torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    tr = make_trace(
        steps=a.steps,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        warmup_lr=a.warmup_lr,
        weight_decay=a.weight_decay,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        seed=a.seed,
        layers=a.layers,
        hidden=a.hidden,
        intermediate_size=a.intermediate,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        vocab_size=a.vocab,
    )
    m = tr["meta"]
    ts = time.perf_counter()
    save_trace(tr, a.out)
    size = os.path.getsize(a.out)
    save_s = time.perf_counter() - ts

    st = m["step_stats"]
    print("summary:", flush=True)
    print(f"  params={m['param_count']:,}  s/step={m['seconds_per_step']:.2f}  warmup={m['warmup']['seconds']:.1f}s")
    if st:
        dens = [100.0 * s["density"] for s in st]
        print("  density per step (%): " + " ".join(f"{d:.4f}" for d in dens) + f"  mean={sum(dens) / len(dens):.4f}")
        agg: Dict[int, int] = {}
        for s in st:
            for d, c in s["hist"]:
                agg[d] = agg.get(d, 0) + c
        other = sum(s["hist_other"] for s in st)
        hist = sorted(([d, c] for d, c in agg.items()), key=lambda x: -x[1])
        print("  delta hist (all steps): " + format_hist(hist, extra_other=other))
    print(f"  wrote {a.out} ({size / 2**20:.1f} MiB, {len(tr['steps'])} snapshots) in {save_s:.1f}s; "
          f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
