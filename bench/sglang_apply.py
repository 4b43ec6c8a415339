"""SGLang loader benchmark: the apply of one sparse update through ``load_weights`` vs init ``direct`` (RuntimeMap).

    python bench/sglang_apply.py [--layers 4] [--experts 64] [--hidden 256] [--moe-intermediate 128] [--runs 5]
                                 [--write]

No SGLang runs here: the model is the Qwen3-MoE fake of ``tests/sglang_models.py`` (SGLang 0.5.23's parameter names
and ``weight_loader`` semantics, fused ``w13_weight`` / ``w2_weight`` experts), scaled to many experts with small
hidden sizes, on the CPU, TP = 1. Its ``load_weights`` imitates SGLang's Python loop per tensor (the stacked and
expert mappings, ``dict(named_parameters())`` per call, narrow + copy per tensor), but a real SGLang's loop does more
per tensor (more mapping entries, EP / quantization branches, logging, device copies from pinned or pageable
memory) and runs on a GPU; the absolute numbers here are not SGLang's, only the ratio of the two paths on the same
Python loop is indicative.

Two workers of the sparsesync SGLang loader (``sparsesync.integrations.sglang.loader.load``), each with its own
model and receiver, one initialised without and one with ``direct``; one ``Sender`` pushes every version to both.
Each version moves ~``--density`` of the bf16 elements of *every* tensor by +-1 ulp (integer views, never across
zero; at least one element per tensor), so every tensor changes every step (the users' report: ~1% of elements per
step changes nearly every tensor). Measured: init time of each worker (the difference is the map's learn time, also
reported by the worker), the map's memory (``RuntimeMap.nbytes_of_map``), and per version the apply time
(``apply_s``: the loads; ``direct_s`` and ``loader_s`` split it) of both workers, median and minimum over ``--runs`` versions.
Every version on both workers is verified bitwise (integer views) against the trainer's state cut into the runtime
layout independently of the loaders (``sglang_models.expected_params``) and by the engine-side digest.

Prints the results; writes ``bench/results/sglang_apply.txt`` only with ``--write`` (otherwise nothing is written).
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import sglang_models as sm
import torch

from sparsesync import Sender, state_digest
from sparsesync.integrations.sglang import COMMAND, encode_command, loader
from sparsesync.safetensors_io import save

TOKEN = "sglang-bench-token"
RESULTS = ROOT / "bench" / "results" / "sglang_apply.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd(**c):
    return [(COMMAND, encode_command(c))]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 1: torch.uint8}[t.element_size()])


def perturb(state: dict, step: int, density: float) -> dict:
    """~density of the elements of every tensor moved by +-1 ulp (never across zero, stays finite); at least one
    element of every tensor."""
    g = torch.Generator().manual_seed(7000 + step)
    out = {}
    for n, t in state.items():
        v = t.clone()
        b = v.view(torch.int16).reshape(-1)
        mag = b & 0x7FFF
        ok = (mag > 1) & (mag < 0x7F00)
        mask = (torch.rand(b.numel(), generator=g) < density) & ok
        if not bool(mask.any()):
            mask[int(torch.nonzero(ok)[0])] = True
        delta = torch.where(torch.rand(b.numel(), generator=g) < 0.5, 1, -1).to(torch.int16)
        b[mask] += delta[mask]
        out[n] = v
    return out


def verify(model, state, cfg) -> None:
    want = sm.expected_params(state, cfg, "qwen3_moe", 0, 1)
    got = dict(model.named_parameters())
    bad = [n for n in want if got[n].shape != want[n].shape or not torch.equal(bits(got[n]), bits(want[n]))]
    if set(got) != set(want) or bad:
        raise SystemExit(f"NOT EXACT: {sorted(set(got) ^ set(want))[:4]} {bad[:6]}")


def slowed(model, delay_s: float):
    """``model.load_weights`` plus ``delay_s`` of sleep per tensor (an emulated heavier per-tensor loader)."""
    if delay_s <= 0:
        return model
    orig = model.load_weights

    def load_weights(weights):
        weights = list(weights)
        time.sleep(delay_s * len(weights))
        return orig(weights)
    model.load_weights = load_weights
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--loader-delay-ms", type=float, nargs="*", default=[0.0],
                    help="runs, each adding this many ms of sleep per tensor to load_weights (0: the fake as is)")
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    a = ap.parse_args()
    text = ""
    for delay in a.loader_delay_ms:
        text += run(a, delay / 1e3) + "\n"
    sys.stdout.write(text)
    if a.write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


def run(a, delay_s: float) -> str:
    cfg = sm.Cfg(vocab_size=a.vocab, hidden_size=a.hidden, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=a.hidden // 8, num_hidden_layers=a.layers, num_experts=a.experts,
                 moe_intermediate_size=a.moe_intermediate)
    ckpt = sm.checkpoint(cfg, "qwen3_moe")
    n_expert = sum(1 for n in ckpt if ".mlp.experts." in n)
    nbytes = sum(t.numel() * t.element_size() for t in ckpt.values())
    lines = [(f"sglang_apply: {len(ckpt)} checkpoint tensors ({n_expert} expert tensors: {a.layers} layers x "
              f"{a.experts} experts x 3), {nbytes / 2**20:.1f} MiB bf16; hidden {a.hidden}, moe_intermediate "
              f"{a.moe_intermediate}, vocab {a.vocab}; ~{a.density:.2%} of the elements of every tensor change per "
              f"version; {a.runs} versions"),
             (f"host: {platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), python {platform.python_version()}; Qwen3-MoE fake of "
              "tests/sglang_models.py (not SGLang), TP=1, CPU")]
    if delay_s > 0:
        lines.append(f"EMULATED heavier loader: load_weights sleeps {delay_s * 1e3:g} ms per tensor on top of the fake "
                     "(the users' report, ~60 s for 18,432 tensors, is ~3.3 ms per tensor); applies to learning too")

    models, addrs, inits = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ckpt"
        d.mkdir()
        save(ckpt, d / "model.safetensors")
        for mode in ("load_weights", "direct"):
            m = sm.Qwen3MoeForCausalLM(cfg)
            sm.load_full(m, ckpt)
            verify(m, ckpt, cfg)
            slowed(m, delay_s)
            port = free_port()
            t0 = time.perf_counter()
            out = loader.load(m, cmd(op="init", listen=f"tcp://127.0.0.1:{port}", token=TOKEN, checkpoint=str(d),
                                     **({"direct": True} if mode == "direct" else {})))
            inits[mode] = time.perf_counter() - t0
            if not out["ok"]:
                raise SystemExit(out["message"])
            verify(m, ckpt, cfg)                       # learning loaded the mirror the weights equal: no change
            models[mode], addrs[mode] = m, out["address"]
    info = loader.worker_for(models["direct"]).direct
    rmap = loader.worker_for(models["direct"]).rmap
    lines.append(f"init (mirror load + receiver start): {inits['load_weights']:.3f} s without direct, "
                 f"{inits['direct']:.3f} s with direct; learn {info['learn_s']:.3f} s for {len(ckpt)} tensors "
                 f"({1e3 * info['learn_s'] / len(ckpt):.2f} ms per tensor): {info['mapped']} mapped "
                 f"({info['copies']} copies), {info['unmapped']} through load_weights "
                 f"({', '.join(sorted(rmap.unmapped))}); map memory {info['map_bytes'] / 2**20:.2f} MiB "
                 f"({info['map_bytes'] / len(ckpt):.0f} B per tensor)")

    # the loader path of the fake, for scale: one full load_weights of every tensor
    t0 = time.perf_counter()
    sm.load_full(slowed(sm.Qwen3MoeForCausalLM(cfg), delay_s), ckpt)
    lines.append(f"one full load_weights of the whole checkpoint into a fresh model: {time.perf_counter() - t0:.3f} s")

    figs = {"load_weights": [], "direct": []}
    state = ckpt
    sender = Sender([addrs["load_weights"], addrs["direct"]], token=TOKEN, base={n: t.clone() for n, t in ckpt.items()},
                    base_version=0, digest=True)
    try:
        for v in range(1, a.runs + 1):
            state = perturb(state, v, a.density)
            st = sender.push(state, version=v)
            if not st.ok:
                raise SystemExit(f"push {v} failed: {st.as_dict()}")
            dig = state_digest(state)
            for mode, m in models.items():
                t0 = time.perf_counter()
                out = loader.load(m, cmd(op="apply", version=v, timeout=60))
                call_s = time.perf_counter() - t0
                if not out["ok"]:
                    raise SystemExit(out["message"])
                if out["changed"] != len(ckpt) or out["loaded"] != len(ckpt):
                    raise SystemExit(f"expected every tensor to change: {out['changed']} / {out['loaded']}")
                verify(m, state, cfg)
                if out["digest"] != dig:
                    raise SystemExit(f"{mode}: engine digest {out['digest']} != trainer's {dig}")
                figs[mode].append({**out, "call_s": call_s})
    finally:
        sender.close()
        for m in models.values():
            loader.load(m, cmd(op="shutdown"))

    def med(mode, key):
        return statistics.median(f[key] for f in figs[mode])
    lines.append(f"apply of one version ({len(ckpt)} tensors changed; median of {a.runs}; every run verified "
                 "bitwise against the trainer's state and by the engine digest):")
    for mode in ("load_weights", "direct"):
        f = figs[mode][-1]
        runs = ", ".join(f"{x['apply_s']:.4f}" for x in figs[mode])
        lo = min(x["apply_s"] for x in figs[mode])
        lines.append(f"  {mode:12s}: apply {med(mode, 'apply_s'):.4f} s, min {lo:.4f} s (direct copies {f['direct_tensors']} "
                     f"tensors {med(mode, 'direct_s'):.4f} s, load_weights {f['loader_tensors']} tensors "
                     f"{med(mode, 'loader_s'):.4f} s); whole loader call {med(mode, 'call_s'):.4f} s; runs "
                     f"{runs}")
    lw, di = med("load_weights", "apply_s"), med("direct", "apply_s")
    lo_lw = min(x["apply_s"] for x in figs["load_weights"])
    lo_di = min(x["apply_s"] for x in figs["direct"])
    payback = info["learn_s"] / max(lw - di, 1e-9)
    lines.append(f"  speed-up of the apply: {lw / di:.1f}x by the medians, {lo_lw / lo_di:.1f}x by the minima (this "
                 f"host is shared: the minima are the less disturbed figures); the learn time equals the savings of "
                 f"{payback:.1f} applies")
    lines.append("Not SGLang: the fake's load_weights imitates SGLang's Python loop (tests/sglang_models.py); a real "
                 "SGLang's per-tensor cost, its learn time, and the host->GPU copies of both paths differ.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
