#!/usr/bin/env python
"""Smoke test: does vLLM's CPU backend run here, and how do weights get into it?

Run with the venv from make_venv.sh:
    PY=$(scripts/vllm/make_venv.sh | tail -n1)
    $PY scripts/vllm/smoke.py --out /tmp/vllm-smoke          # everything (~10-20 min on 2 cores)
    $PY scripts/vllm/smoke.py --only basic                    # just bf16 probe + one generation

Nothing is downloaded: tiny random models are built with `transformers` from a config (Llama with 2 layers,
hidden 256, grouped-query attention 4 q heads / 2 kv heads of size 64, vocab 1024, tied and untied; a Qwen3-MoE
with 8 experts, 2 per token) and saved into a temp dir. vLLM runs with skip_tokenizer_init=True and token-id
prompts, so no tokenizer is needed.

Every engine runs in its own child process (this file re-invoked with --child SPEC), so a SIGILL (bf16 on some
Intel AMX machines), a hang or an OOM is contained, and startup time / memory are measured per engine.

What it checks (each line of the summary says PASS/FAIL/INFO):
  * bf16 works (probed in a child; falls back to float32 if the child dies) and which CPU flags the host has;
  * greedy generations + prompt logprobs for a fixed prompt set; two fresh engines agree bit for bit;
  * where the model runs: pids of the driver, EngineCore and worker for VLLM_ENABLE_V1_MULTIPROCESSING=0/1;
  * runtime parameter layout (fused qkv_proj/gate_up_proj, repacked linear weights of shape (0,), weight_loader);
  * a weight-transfer backend registered through a `vllm.general_plugins` entry point (a throwaway dist-info on
    PYTHONPATH, not installed anywhere) is found in every process, and LLM.init_weight_transfer_engine /
    start_weight_update / update_weights / finish_weight_update reach it; inside, it applies checkpoint tensors
    with vLLM's layerwise reload (initialize_layerwise_reload -> model.load_weights -> finalize_layerwise_reload)
    and the result is compared bit for bit with an engine loaded fresh from the target checkpoint, for:
      - all tensors of the checkpoint ("full"),
      - all checkpoint tensors of every runtime module that has a changed tensor ("modules"),
      - only the changed tensors ("changed": expected to corrupt fused modules on the CPU backend),
      - a failing load (tied lm_head without embed_tokens) and what state it leaves the engine in;
  * the same on the tiny Qwen3-MoE, and tensor_parallel_size=2 if the machine can start it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 1024
PROMPTS = [
    [11, 523, 87, 901, 42],
    [7, 7, 7, 300, 301, 302, 303, 17, 99],
    [1000, 2, 555, 64, 128, 256, 512, 3, 9, 27, 81, 243],
    [5, 400, 13],
]
MAX_TOKENS = 8
ENGINE_KW = dict(enforce_eager=True, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=8, seed=0)
PLUGIN_NAME = "ssprobe"


# ----------------------------------------------------------------------------------------------------------------
# host facts
# ----------------------------------------------------------------------------------------------------------------
def cpu_facts() -> dict:
    flags: set[str] = set()
    model = vendor = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(val.split())
            elif key == "model name" and not model:
                model = val.strip()
            elif key == "vendor_id" and not vendor:
                vendor = val.strip()
    except OSError:
        pass
    want = ["avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
            "amx_int8", "amx_fp16"]
    return {"vendor": vendor, "model": model, "cpus": os.cpu_count(),
            "flags": {f: (f in flags) for f in want}}


# ----------------------------------------------------------------------------------------------------------------
# tiny checkpoints
# ----------------------------------------------------------------------------------------------------------------
def build_models(root: Path) -> dict[str, str]:
    import torch
    import transformers as tf

    torch.manual_seed(1234)
    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    out = {}
    for name, tied in (("llama_untied", False), ("llama_tied", True)):
        cfg = tf.LlamaConfig(intermediate_size=512, tie_word_embeddings=tied, **common)
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
        d = root / name
        model.save_pretrained(d)
        out[name] = str(d)
    cfg = tf.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                            tie_word_embeddings=False, **common)
    model = tf.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    d = root / "qwen3_moe"
    model.save_pretrained(d)
    out["qwen3_moe"] = str(d)
    return out


def read_ckpt(d: str) -> dict:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def perturb(src: str, dst: str, names_frac: list[tuple[str, float]], seed: int) -> dict:
    """Copy checkpoint src to dst with ~frac of the elements of each named tensor changed (bf16)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = read_ckpt(src)
    changed = {}
    for name, frac in names_frac:
        t = sd[name].clone()
        flat = t.view(-1)
        k = max(1, int(flat.numel() * frac))
        idx = torch.randperm(flat.numel(), generator=g)[:k]
        noise = torch.randn(k, generator=g) * 0.05
        flat[idx] = (flat[idx].float() + noise).to(t.dtype)
        flat[idx[0]] = -0.0  # a negative zero somewhere
        sd[name] = t
        changed[name] = int(k)
    os.makedirs(dst, exist_ok=True)
    for f in Path(src).iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, Path(dst) / f.name)
    save_file(sd, str(Path(dst) / "model.safetensors"), metadata={"format": "pt"})
    return changed


# ----------------------------------------------------------------------------------------------------------------
# a throwaway vllm.general_plugins entry point (dist-info on PYTHONPATH) with a weight-transfer engine
# ----------------------------------------------------------------------------------------------------------------
PLUGIN_SRC = r'''
"""Throwaway probe plugin written by scripts/vllm/smoke.py (not part of sparsesync)."""
import os, sys, json, time
from dataclasses import dataclass

def _log(event, **kw):
    path = os.environ.get("SSPROBE_LOG")
    if path:
        rec = dict(event=event, pid=os.getpid(), ppid=os.getppid(), argv0=sys.argv[0][-60:], **kw)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

def register():
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory
    if "ssprobe" not in WeightTransferEngineFactory._registry:
        # lazy registration by module path: the module is imported only when the engine is created
        WeightTransferEngineFactory.register_engine("ssprobe", "ssprobe_plugin", "ProbeEngine")
    try:
        import setproctitle
        title = setproctitle.getproctitle()[:60]
    except Exception:
        title = ""
    _log("register", title=title)

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo)

@dataclass
class ProbeInit(WeightTransferInitInfo):
    listen: str = ""
    token: str = ""
    version: int = 0

@dataclass
class ProbeUpdate(WeightTransferUpdateInfo):
    version: int = 0
    timeout: float = 10.0
    path: str = ""
    names: list | None = None      # None: every tensor of the checkpoint
    raw: bool = False              # True: call model.load_weights without layerwise reload
    rename: dict | None = None     # checkpoint name -> name passed to load_weights
    inplace: bool = False          # True: copy_ into the runtime parameter of the same name and shape
    fixups: bool = False           # True: re-run the CPU post-load steps vLLM 0.32's reload misses
    truncate: list | None = None   # names whose tensor is cut by one row (a malformed update)
    abort_on_error: bool = False   # True: on a failed layerwise load, put the kernel tensors back (abort_layerwise)

def abort_layerwise(model):
    """Undo initialize_layerwise_reload for every layer that was not processed yet: re-register its kernel
    tensors (old values, untouched) and clear its buffered loads. Layers that were already processed keep the
    NEW values, so the model is left mixed (alive, but neither version) until those layers are reloaded."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        LOADING_LAYERS, _place_kernel_tensors, get_layerwise_info)
    restored = 0
    for layer in model.modules():
        info = get_layerwise_info(layer)
        if info.can_load():
            _place_kernel_tensors(layer, info)
            info.reset()
            restored += 1
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    LOADING_LAYERS.clear()
    return restored

def cpu_fixups(model, names):
    """Post-load steps that vLLM 0.32's layerwise reload does not redo on the CPU backend:
    1. unquantized MoE: UnquantizedFusedMoEMethod._setup_kernel skips
       moe_kernel.fused_experts.process_weights_after_loading (the CPU prepack) on a weight update;
    2. tied embeddings: only the first module of a tied pair is re-processed, so the lm_head keeps
       the oneDNN-packed copy of the old embedding for the logits GEMM."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    done = []
    moe_prefixes = {n.split(".experts.")[0] + ".experts" for n in names if ".experts." in n}
    for mname, mod in model.named_modules():
        if isinstance(mod, RoutedExperts) and any(mname.startswith(p) for p in moe_prefixes):
            mod.quant_method.moe_kernel.fused_experts.process_weights_after_loading(mod)
            done.append(mname)
    groups = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, VocabParallelEmbedding):
            groups.setdefault(id(mod.weight), []).append((mname, mod))
    for members in groups.values():
        if len(members) > 1 and any(n.startswith(m + ".") for m, _ in members for n in names):
            for mname, mod in members:
                mod.quant_method.process_weights_after_loading(mod)
                done.append(mname)
    return done

class ProbeEngine(WeightTransferEngine):
    init_info_cls = ProbeInit
    update_info_cls = ProbeUpdate

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        _log("engine_init", device=str(device), model=type(model).__name__)

    def init_transfer_engine(self, init_info):
        self.init_info = init_info
        _log("init_transfer_engine", info=vars(init_info))

    def start_weight_update(self):
        _log("start_weight_update")

    def receive_weights(self, info):
        import torch
        from safetensors.torch import load_file
        from vllm.model_executor.model_loader.reload import (
            initialize_layerwise_reload, finalize_layerwise_reload)
        sd = {}
        for f in sorted(os.listdir(info.path)):
            if f.endswith(".safetensors"):
                sd.update(load_file(os.path.join(info.path, f)))
        items = [(k, v) for k, v in sd.items() if info.names is None or k in info.names]
        if info.rename:
            items = [(info.rename.get(k, k), v) for k, v in items]
        if info.truncate:
            items = [(k, v[:-1] if k in info.truncate else v) for k, v in items]
        t0 = time.perf_counter()
        err = None
        if info.inplace:
            params = dict(self.model.named_parameters())
            done, skipped = [], []
            with torch.no_grad():
                for k, v in items:
                    p = params.get(k)
                    if p is not None and tuple(p.shape) == tuple(v.shape):
                        p.data.copy_(v)
                        done.append(k)
                    else:
                        skipped.append(k)
            _log("receive_weights", version=info.version, inplace=done, skipped=skipped)
            if skipped:
                raise RuntimeError(f"no runtime parameter of the same name/shape for {skipped}")
            return
        try:
            if info.raw:
                loaded = self.model.load_weights(iter(items))
            else:
                initialize_layerwise_reload(self.model)
                loaded = self.model.load_weights(iter(items))
                finalize_layerwise_reload(self.model, self.model_config)
            fixed = cpu_fixups(self.model, [k for k, _ in items]) if info.fixups else []
        except BaseException as e:
            err = f"{type(e).__name__}: {e}"
            restored = abort_layerwise(self.model) if info.abort_on_error and not info.raw else None
            _log("receive_weights", version=info.version, n=len(items), error=err[:400], restored=restored)
            raise
        _log("receive_weights", version=info.version, n=len(items), loaded=len(loaded), fixups=fixed,
             seconds=round(time.perf_counter() - t0, 4))

    def finish_weight_update(self):
        _log("finish_weight_update")

    def shutdown(self):
        _log("shutdown")
'''


def make_plugin_dir(root: Path) -> Path:
    d = root / "plugin"
    di = d / "ssprobe_plugin-0.0.dist-info"
    di.mkdir(parents=True, exist_ok=True)
    (d / "ssprobe_plugin.py").write_text(PLUGIN_SRC)
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: ssprobe-plugin\nVersion: 0.0\n")
    (di / "entry_points.txt").write_text("[vllm.general_plugins]\nssprobe = ssprobe_plugin:register\n")
    return d


# ----------------------------------------------------------------------------------------------------------------
# child: one engine
# ----------------------------------------------------------------------------------------------------------------
def _introspect(self) -> dict:
    """Runs inside each vLLM worker (collective_rpc with a callable; `self` is the worker)."""
    import os
    import torch
    model = self.model_runner.model
    params = list(model.named_parameters())
    empty = [n for n, p in params if p.numel() == 0]
    no_loader = [n for n, p in params if not hasattr(p, "weight_loader")]
    mods = dict(model.named_modules())
    qkv = next((m for n, m in mods.items() if n.endswith("self_attn.qkv_proj")), None)
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        tp = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    except Exception as e:  # noqa: BLE001
        tp = repr(e)
    sums = self.compute_weight_checksums()
    return {
        "pid": os.getpid(), "ppid": os.getppid(),
        "worker_mro": [c.__module__ + "." + c.__qualname__ for c in type(self).__mro__[:4]],
        "model_cls": type(model).__module__ + "." + type(model).__qualname__,
        "same_as_get_model": self.model_runner.get_model() is model,
        "params": [(n, list(p.shape), str(p.dtype).replace("torch.", "")) for n, p in params],
        "empty_params": empty, "params_without_weight_loader": no_loader,
        "qkv_cpu_linear": repr(getattr(qkv, "cpu_linear", None))[:80] if qkv is not None else None,
        "qkv_weight_loader": getattr(getattr(qkv, "weight", None), "weight_loader", None).__qualname__
        if qkv is not None and hasattr(getattr(qkv, "weight", None), "weight_loader") else None,
        "weight_transfer_engine": type(self.weight_transfer_engine).__name__
        if getattr(self, "weight_transfer_engine", None) is not None else None,
        "tp": tp, "torch_threads": torch.get_num_threads(),
        "checksums": len(sums), "checksum_sample": sorted(sums.items())[:2],
        "checksums_of_empty": sorted(k for k, v in sums.items() if v == hashlib.sha256(b"").hexdigest()),
    }


def _logprob_record(outputs) -> dict:
    gens, plps = [], []
    for o in outputs:
        gens.append(list(o.outputs[0].token_ids))
        rows = []
        for pos, d in enumerate(o.prompt_logprobs or []):
            if d is None:
                rows.append(None)
                continue
            tok = o.prompt_token_ids[pos]
            rows.append(float(d[tok].logprob).hex())
        plps.append(rows)
    h = hashlib.sha256(json.dumps([gens, plps]).encode()).hexdigest()[:16]
    return {"gen": gens, "hash": h, "plp_first": plps[0][:4]}


def _tree_rss() -> int:
    import psutil
    me = psutil.Process()
    total = me.memory_info().rss
    for c in me.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total


def child(spec: dict) -> dict:
    t_import = time.perf_counter()
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    kw = dict(ENGINE_KW)
    kw.update(spec.get("engine_kw", {}))
    if spec.get("backend"):
        kw["weight_transfer_config"] = {"backend": spec["backend"]}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], tensor_parallel_size=spec.get("tp", 1), **kw)
    res = {"import_s": round(t0 - t_import, 2), "startup_s": round(time.perf_counter() - t0, 2),
           "rss_after_start_mb": round(_tree_rss() / 2**20), "driver_pid": os.getpid()}
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, prompt_logprobs=1, detokenize=False,
                        ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]

    def run() -> dict:
        t = time.perf_counter()
        out = llm.generate(prompts, sp, use_tqdm=False)
        r = _logprob_record(out)
        r["gen_s"] = round(time.perf_counter() - t, 3)
        return r

    res["initial"] = run()
    if spec.get("introspect"):
        res["workers"] = llm.collective_rpc(_introspect)
    stages = []
    if spec.get("backend"):
        llm.init_weight_transfer_engine({"init_info": {"listen": "tcp://127.0.0.1:0", "token": "t", "version": 0}})
    for i, st in enumerate(spec.get("updates", [])):
        rec = {"label": st["label"], "want": st.get("want")}
        t = time.perf_counter()
        try:
            llm.start_weight_update()
            info = {"version": i + 1, "path": st["path"]}
            info.update({k: st[k] for k in ("names", "raw", "rename", "inplace", "fixups", "truncate", "abort_on_error")
                         if k in st})
            llm.update_weights({"update_info": info})
            llm.finish_weight_update(weight_version=str(i + 1))
            rec["ok"] = True
        except BaseException as e:  # noqa: BLE001
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rec["update_s"] = round(time.perf_counter() - t, 3)
        try:
            rec["weight_version"] = llm.get_weight_version()
            llm.reset_prefix_cache()  # weight updates do not reset vLLM's prefix cache themselves
            rec.update(run())
        except BaseException as e:  # noqa: BLE001
            rec["run_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if "EngineDead" in type(e).__name__:
                stages.append(rec)
                res["engine_dead_after"] = rec["label"]
                break
        if st.get("recheck_start"):  # can a new update start after a failed one?
            try:
                llm.start_weight_update()
                llm.finish_weight_update()
                rec["next_start_ok"] = True
            except BaseException as e:  # noqa: BLE001
                rec["next_start_ok"] = f"{type(e).__name__}: {str(e)[:200]}"
        stages.append(rec)
    res["stages"] = stages
    res["rss_end_mb"] = round(_tree_rss() / 2**20)
    return res


# ----------------------------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, out: Path, plugin_dir: Path):
        self.out = out
        self.plugin_dir = plugin_dir
        self.n = 0
        self.results: dict[str, dict] = {}

    def run(self, label: str, spec: dict, mp: int = 0, timeout: int = 600, extra_env: dict | None = None) -> dict:
        self.n += 1
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update({
            "VLLM_ENABLE_V1_MULTIPROCESSING": str(mp),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # collective_rpc(<callable>) through the EngineCore process (mp=1) is refused by vLLM's msgpack
            # encoder unless this is set; only the introspection here needs it
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
            "SSPROBE_LOG": str(self.out / f"plugin-{self.n:02d}-{label}.jsonl"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(self.plugin_dir), env.get("PYTHONPATH", "")])),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        })
        log = self.out / f"child-{self.n:02d}-{label}.log"
        result_path = self.out / f"child-{self.n:02d}-{label}.json"
        result_path.unlink(missing_ok=True)
        spec = dict(spec, result_path=str(result_path))
        t = time.perf_counter()
        with open(log, "w") as lf:  # vLLM logs to stdout: child stdout and stderr both go to the log
            p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env, stdout=lf,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = "timeout"
        try:  # reap anything the child left behind (EngineCore / worker processes of the session)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wall = round(time.perf_counter() - t, 1)
        res = {"rc": rc, "wall_s": wall, "log": str(log), "mp": mp}
        if isinstance(rc, int) and rc < 0:
            res["signal"] = signal.Signals(-rc).name
        if result_path.exists():
            res.update(json.loads(result_path.read_text()))
        plog = Path(env["SSPROBE_LOG"])
        if plog.exists():
            res["plugin_events"] = [json.loads(x) for x in plog.read_text().splitlines()]
        if rc != 0:
            res["log_tail"] = log.read_text()[-1500:]
        self.results[label] = res
        print(f"[{label}] rc={rc} wall={wall}s startup={res.get('startup_s')}s "
              f"rss={res.get('rss_after_start_mb')}MB hash={res.get('initial', {}).get('hash')}", flush=True)
        return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="directory for results.json and child logs (default: temp dir)")
    ap.add_argument("--only", choices=["basic", "llama", "all"], default="all")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--skip-tp2", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp checkpoints")
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.child)
        res = child(spec)
        Path(spec["result_path"]).write_text(json.dumps(res))
        sys.stdout.flush()
        sys.stderr.flush()
        # skip interpreter teardown of vLLM's background threads/processes (can hang on CPU)
        os._exit(0)

    out = Path(args.out or tempfile.mkdtemp(prefix="vllm-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-smoke-models-"))
    summary: list[str] = []

    def note(status: str, msg: str) -> None:
        summary.append(f"{status:4s} {msg}")
        print(f"{status:4s} {msg}", flush=True)

    T0 = time.perf_counter()
    facts = cpu_facts()
    print("CPU:", json.dumps(facts), flush=True)
    import torch
    print(f"torch {torch.__version__}; torch.cpu._is_avx512_bf16_supported()={torch.cpu._is_avx512_bf16_supported()} "
          f"_is_amx_tile_supported()={torch.cpu._is_amx_tile_supported()}", flush=True)
    facts["torch_avx512_bf16"] = bool(torch.cpu._is_avx512_bf16_supported())
    facts["torch_amx_tile"] = bool(torch.cpu._is_amx_tile_supported())

    t = time.perf_counter()
    models = build_models(work)
    note("INFO", f"built tiny checkpoints in {time.perf_counter() - t:.1f}s under {work}")
    for name, d in models.items():
        keys = sorted(read_ckpt(d))
        note("INFO", f"{name}: {len(keys)} tensors, e.g. {[k for k in keys if 'layers.0.' in k][:12]}")
    plugin_dir = make_plugin_dir(work)
    R = Runner(out, plugin_dir)

    # 1. bf16 probe (child process; a SIGILL kills only the child)
    r = R.run("probe-bf16", {"model": models["llama_untied"], "dtype": "bfloat16"}, mp=0)
    if r["rc"] == 0:
        dtype = "bfloat16"
        note("PASS", f"bf16 generation works here (startup {r['startup_s']}s, generate {r['initial']['gen_s']}s)")
    else:
        dtype = "float32"
        note("INFO", f"bf16 child failed (rc={r['rc']} {r.get('signal', '')}); falling back to float32")
        r = R.run("probe-fp32", {"model": models["llama_untied"], "dtype": "float32"}, mp=0)
        if r["rc"] != 0:
            note("FAIL", "float32 child failed too; see " + r["log"])
            return finish(out, facts, R, summary, None, T0)
        note("PASS", "float32 generation works")
    print(f"DTYPE USED: {dtype}", flush=True)
    if args.only == "basic":
        return finish(out, facts, R, summary, dtype, T0)

    # 2. untied Llama: checkpoints for versions 1..3
    u0 = models["llama_untied"]
    u1, u2, u3 = (str(work / f"llama_untied_v{i}") for i in (1, 2, 3))
    changed = perturb(u0, u1, [("model.embed_tokens.weight", 0.01), ("model.layers.0.self_attn.q_proj.weight", 0.01),
                               ("model.layers.1.self_attn.v_proj.weight", 0.01),
                               ("model.layers.0.mlp.down_proj.weight", 0.01),
                               ("model.layers.1.mlp.gate_proj.weight", 0.01), ("model.norm.weight", 0.05),
                               ("lm_head.weight", 0.01)], seed=1)
    perturb(u1, u2, [("model.norm.weight", 0.05)], seed=11)       # v2 = v1 + a norm change
    perturb(u2, u3, [("lm_head.weight", 0.01)], seed=12)          # v3 = v2 + an lm_head change
    all_u = sorted(read_ckpt(u0))
    modules = module_closure(changed, all_u)
    note("INFO", f"v1 changes {len(changed)} tensors; their runtime modules need {len(modules)} checkpoint tensors")

    ref0 = R.run("fresh-untied-v0-mp0", {"model": u0, "dtype": dtype, "introspect": True}, mp=0)
    hs = {0: ref0.get("initial", {}).get("hash")}
    for i, d in ((1, u1), (2, u2), (3, u3)):
        hs[i] = R.run(f"fresh-untied-v{i}-mp0", {"model": d, "dtype": dtype}, mp=0).get("initial", {}).get("hash")
    h0, h1 = hs[0], hs[1]
    probe_h = R.results["probe-bf16" if dtype == "bfloat16" else "probe-fp32"].get("initial", {}).get("hash")
    note("PASS" if h0 == probe_h else "FAIL", f"two fresh engines on v0 agree bit for bit ({h0} vs {probe_h})")
    note("PASS" if len(set(hs.values())) == 4 else "FAIL", f"v0..v3 give four different logprob sets {hs}")

    upd = R.run("update-untied-mp1", {
        "model": u0, "dtype": dtype, "backend": PLUGIN_NAME, "introspect": True,
        "updates": [
            {"label": "modules->v1", "path": u1, "names": modules, "want": hs[1]},
            {"label": "full->v0 (rollback)", "path": u0, "want": hs[0]},
            {"label": "changed-only->v1 (partial fused modules)", "path": u1, "names": sorted(changed), "want": None},
            {"label": "full->v1", "path": u1, "want": hs[1]},
            {"label": "in-place copy_ model.norm.weight->v2", "path": u2, "names": ["model.norm.weight"],
             "inplace": True, "want": hs[2]},
            {"label": "in-place copy_ lm_head.weight->v3 (packed copy is stale?)", "path": u3, "names": ["lm_head.weight"],
             "inplace": True, "want": None},
            {"label": "layerwise lm_head.weight->v3", "path": u3, "names": ["lm_head.weight"], "want": hs[3]},
            {"label": "layerwise full->v0 with a truncated down_proj (expect error; engine state after?)",
             "path": u0, "truncate": ["model.layers.1.mlp.down_proj.weight"], "recheck_start": True, "want": None},
            {"label": "full->v3 after the failed update", "path": u3, "want": hs[3]},
        ]}, mp=1)
    report_stages(note, "untied", upd, hs)
    if upd["rc"] == 0:
        note("PASS" if upd["initial"]["hash"] == h0 else "FAIL",
             f"VLLM_ENABLE_V1_MULTIPROCESSING=1 engine agrees with the in-process one on v0 ({upd['initial']['hash']})")
        pids = {e["event"]: e["pid"] for e in upd.get("plugin_events", [])}
        regs = [(e["pid"], e["ppid"], e.get("title")) for e in upd.get("plugin_events", []) if e["event"] == "register"]
        note("INFO", f"mp=1: driver pid {upd['driver_pid']}; plugin register() ran in (pid, ppid, title) {regs}; "
                     f"weight-transfer engine created in pid {pids.get('engine_init')}; worker pids "
                     f"{[w['pid'] for w in upd.get('workers', [])]}")
    w0 = (ref0.get("workers") or [{}])[0]
    note("INFO", f"mp=0: driver pid {ref0.get('driver_pid')}, worker pid {w0.get('pid')} "
                 f"(same process: {ref0.get('driver_pid') == w0.get('pid')})")
    note("INFO", f"mp=0 worker: empty params after load: {w0.get('empty_params')}")

    # 3. tied Llama: embed change only; lm_head alone must fail; state after a failed load
    t0_ = models["llama_tied"]
    t1_ = str(work / "llama_tied_v1")
    perturb(t0_, t1_, [("model.embed_tokens.weight", 0.01)], seed=2)
    th = {1: R.run("fresh-tied-v1-mp0", {"model": t1_, "dtype": dtype}, mp=0).get("initial", {}).get("hash")}
    as_lm_head = {"model.embed_tokens.weight": "lm_head.weight"}
    tupd = R.run("update-tied-mp0", {
        "model": t0_, "dtype": dtype, "backend": PLUGIN_NAME, "introspect": True,
        "updates": [
            {"label": "embed_tokens only->v1, no fixups", "path": t1_, "names": ["model.embed_tokens.weight"],
             "want": None},
            {"label": "embed_tokens only->v1 + fixups (re-process tied lm_head)", "path": t1_,
             "names": ["model.embed_tokens.weight"], "fixups": True, "want": th[1]},
            {"label": "raw load_weights([lm_head.weight]) (expect ValueError)", "path": t1_,
             "names": ["model.embed_tokens.weight"], "rename": as_lm_head, "raw": True, "recheck_start": True,
             "want": th[1]},
            {"label": "full->v0 + fixups", "path": t0_, "fixups": True, "want": None},
            {"label": "layerwise reload of [lm_head.weight = v1 embedding] alone, no fixups", "path": t1_,
             "names": ["model.embed_tokens.weight"], "rename": as_lm_head, "recheck_start": True, "want": th[1]},
            {"label": "full->v0 + fixups (again)", "path": t0_, "fixups": True, "want": None},
            {"label": "full->v1 + fixups after the failed reload", "path": t1_, "fixups": True, "want": th[1]},
            {"label": "full->v0 + fixups (third time)", "path": t0_, "fixups": True, "want": None},
            {"label": "layerwise full->v1 with a truncated down_proj + abort_layerwise (expect error, engine alive)",
             "path": t1_, "truncate": ["model.layers.1.mlp.down_proj.weight"], "abort_on_error": True,
             "fixups": True, "recheck_start": True, "want": None},
            {"label": "full->v1 + fixups after the aborted update", "path": t1_, "fixups": True, "want": th[1]},
            {"label": "layerwise full->v0 with a truncated down_proj, NO abort, in-process (expect error)",
             "path": t0_, "truncate": ["model.layers.1.mlp.down_proj.weight"], "recheck_start": True, "want": None},
            {"label": "full->v1 + fixups after the un-aborted failure (is the model poisoned?)", "path": t1_,
             "fixups": True, "want": None},
        ]}, mp=0)
    th[0] = tupd.get("initial", {}).get("hash")
    report_stages(note, "tied", tupd, th)

    # 4. Qwen3-MoE
    if not args.skip_moe and args.only == "all":
        m0 = models["qwen3_moe"]
        m1 = str(work / "qwen3_moe_v1")
        keys = sorted(read_ckpt(m0))
        exp = [k for k in keys if ".experts." in k and "layers.1." in k][:3]
        mchanged = perturb(m0, m1, [("model.layers.0.self_attn.k_proj.weight", 0.01),
                                    ("model.layers.0.mlp.gate.weight", 0.02)] + [(k, 0.01) for k in exp], seed=3)
        mmods = module_closure(mchanged, keys)
        mh = {0: R.run("fresh-moe-v0-mp0", {"model": m0, "dtype": dtype}, mp=0).get("initial", {}).get("hash"),
              1: R.run("fresh-moe-v1-mp0", {"model": m1, "dtype": dtype}, mp=0).get("initial", {}).get("hash")}
        mupd = R.run("update-moe-mp0", {"model": m0, "dtype": dtype, "backend": PLUGIN_NAME, "introspect": True,
                                        "updates": [
                                            {"label": "full->v0 (same weights), no fixups", "path": m0, "want": None},
                                            {"label": "full->v0 + fixups (re-prepack experts)", "path": m0,
                                             "fixups": True, "want": mh[0]},
                                            {"label": f"modules->v1 ({len(mmods)} tensors) + fixups", "path": m1,
                                             "names": mmods, "fixups": True, "want": mh[1]},
                                            {"label": "full->v1 + fixups", "path": m1, "fixups": True,
                                             "want": mh[1]}]}, mp=0)
        if mupd["rc"] == 0:
            note("PASS" if mupd["initial"]["hash"] == mh[0] else "FAIL",
                 f"Qwen3-MoE ({dtype}) starts in {mupd['startup_s']}s, rss {mupd['rss_after_start_mb']} MB; "
                 f"two fresh engines agree ({mupd['initial']['hash']} vs {mh[0]})")
        report_stages(note, "moe", mupd, mh)

    # 5. tensor_parallel_size=2 (two CPU workers; auto thread binding wants one NUMA node per worker)
    if not args.skip_tp2 and args.only == "all":
        bind = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("SMOKE_TP2_BIND", "0|1")}
        tref = R.run("fresh-untied-v1-tp2-mp1", {"model": u1, "dtype": dtype, "tp": 2}, mp=1, timeout=900,
                     extra_env=bind)
        tph = {1: tref.get("initial", {}).get("hash")}
        tp = R.run("update-untied-tp2-mp1", {
            "model": u0, "dtype": dtype, "tp": 2, "backend": PLUGIN_NAME, "introspect": True,
            "updates": [{"label": "modules->v1", "path": u1, "names": modules, "want": tph[1]},
                        {"label": "full->v1", "path": u1, "want": tph[1]}]}, mp=1, timeout=900, extra_env=bind)
        if tp["rc"] == 0:
            note("PASS", f"tensor_parallel_size=2 starts ({tp['startup_s']}s, rss {tp['rss_after_start_mb']} MB); "
                         f"v0 hash {tp['initial']['hash']} (tp1 {h0}: "
                         f"{'equal' if tp['initial']['hash'] == h0 else 'different'}); fresh v1 tp2 {tph[1]} "
                         f"(tp1 {h1}: {'equal' if tph[1] == h1 else 'different'})")
            for w in tp.get("workers", []):
                emb = [p for p in w["params"] if "embed_tokens" in p[0] or "lm_head" in p[0] or "norm" in p[0]][:3]
                note("INFO", f"tp2 worker pid {w['pid']} tp={w['tp']} shapes {emb}")
        report_stages(note, "tp2", tp, tph)

    res = finish(out, facts, R, summary, dtype, T0)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report_stages(note, tag: str, r: dict, refs: dict) -> None:
    """One summary line per update stage: PASS/FAIL where the stage names the hash it must reach, INFO otherwise."""
    if r.get("rc") != 0:
        note("FAIL", f"{tag}: child failed rc={r.get('rc')} {r.get('signal', '')}; see {r.get('log')}")
        return
    known = {v: k for k, v in refs.items()}
    if r.get("engine_dead_after"):
        note("INFO", f"{tag}: the engine died (EngineDeadError) after stage '{r['engine_dead_after']}'")
    for st in r.get("stages", []):
        got = st.get("hash")
        state = f"v{known[got]}" if got in known else "matches no fresh engine"
        extra = "".join(f" {k}={str(st[k])[:160]!r}" for k in ("error", "run_error", "next_start_ok") if k in st)
        want = st.get("want")
        status = "INFO" if want is None else ("PASS" if got == want else "FAIL")
        note(status, f"{tag}: '{st['label']}' ok={st.get('ok')} {st.get('update_s')}s -> {got} ({state}){extra}")


def module_closure(changed: dict, all_names: list[str]) -> list[str]:
    """Every checkpoint tensor that lands in the same runtime module as a changed tensor
    (q/k/v -> qkv_proj, gate/up -> gate_up_proj, any expert weight -> that layer's fused experts)."""
    def key(n: str) -> str:
        for a in (".q_proj.", ".k_proj.", ".v_proj."):
            n = n.replace(a, ".qkv_proj.")
        for a in (".gate_proj.", ".up_proj."):
            if ".experts." not in n:
                n = n.replace(a, ".gate_up_proj.")
        if ".experts." in n:
            n = n.split(".experts.")[0] + ".experts"
        return n
    want = {key(n) for n in changed}
    return sorted(n for n in all_names if key(n) in want)


def finish(out: Path, facts: dict, R: Runner, summary: list[str], dtype, T0) -> int:
    total = round(time.perf_counter() - T0, 1)
    (out / "results.json").write_text(json.dumps({"cpu": facts, "dtype": dtype, "total_s": total,
                                                  "summary": summary, "runs": R.results}, indent=1))
    print("\n==== summary ====")
    print(f"CPU: {facts['vendor']} {facts['model']}; flags " +
          " ".join(f"{k}={'y' if v else 'n'}" for k, v in facts["flags"].items()))
    print(f"dtype used: {dtype}; total {total}s; details in {out}/results.json")
    for s in summary:
        print(s)
    return 1 if any(s.startswith("FAIL") for s in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
