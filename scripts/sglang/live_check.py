"""Live check of the SGLang integration on a machine that runs SGLang 0.5.23 (CUDA GPU). NEVER RUN YET: written
against the 0.5.23 source only (no machine of this project could run SGLang). Run it where SGLang works:

    python scripts/sglang/live_check.py [--tp 1] [--out DIR]

It builds a tiny random Llama checkpoint (transformers, nothing downloaded), starts an in-process ``sglang.Engine``
with the sparsesync loader, initialises the receivers, pushes two sparse bf16 updates with a ``Sender`` and applies
them through ``SGLangClient``; after each it compares greedy output tokens and logprobs with a fresh Engine started
from a checkpoint of that version (must be identical), and the receivers' digests with the trainer's. Exit code 0
when every check passed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch


def make_checkpoint(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)


def engine(path: str, tp: int):
    import sglang
    from sparsesync.integrations.sglang import LOADER
    return sglang.Engine(model_path=path, skip_tokenizer_init=True, tp_size=tp, mem_fraction_static=0.3,
                         random_seed=0, custom_weight_loader=[LOADER], log_level="warning")


def greedy(eng) -> list:
    prompts = [[1, 5, 9, 13, 17, 21], [2, 4, 6, 8]]
    out = eng.generate(input_ids=prompts, sampling_params={"temperature": 0.0, "max_new_tokens": 8,
                                                           "ignore_eos": True}, return_logprob=True)
    return [(o["output_ids"], [lp[0] for lp in o["meta_info"]["output_token_logprobs"]]) for o in out]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--port", type=int, default=7300)
    args = ap.parse_args()
    from sparsesync import Sender, state_digest
    from sparsesync.integrations.sglang.client import SGLangClient
    from sparsesync.integrations.vllm.checkpoint import load_mirror
    from sparsesync.safetensors_io import save

    work = args.out or tempfile.mkdtemp(prefix="ss-sglang-")
    base = os.path.join(work, "v0")
    make_checkpoint(base)
    token = "live-check-token"
    state = load_mirror(base)
    eng = engine(base, args.tp)
    report, ok = {"tp": args.tp, "versions": []}, True
    try:
        client = SGLangClient(eng, listen=f"tcp://127.0.0.1:{args.port}", token=token, tp_size=args.tp)
        client.init(version=0, checkpoint=base)
        with Sender(client.workers, token=token, base=state, base_version=0, digest=True) as sender:
            for v in (1, 2):
                g = torch.Generator().manual_seed(v)
                new = {}
                for n, t in state.items():
                    b = t.clone().view(torch.int16)
                    mask = (torch.rand(b.shape, generator=g) < 0.01) & ((b & 0x7FFF) > 1) & ((b & 0x7FFF) < 0x7F00)
                    b[mask] += 1
                    new[n] = b.view(torch.bfloat16)
                state = new
                sender.push(state, version=v)
                rep = client.update(v, timeout=60)
                digests_ok = set(rep["digests"].values()) == {state_digest(state)}
                ckpt = os.path.join(work, f"v{v}")
                os.makedirs(ckpt, exist_ok=True)
                for f in os.listdir(base):
                    if f.endswith(".json"):
                        with open(os.path.join(base, f)) as src, open(os.path.join(ckpt, f), "w") as dst:
                            dst.write(src.read())
                save(state, os.path.join(ckpt, "model.safetensors"))
                got = greedy(eng)
                fresh = engine(ckpt, args.tp)
                try:
                    want = greedy(fresh)
                finally:
                    fresh.shutdown()
                same = got == want
                ok &= same and digests_ok
                report["versions"].append({"version": v, "digests_ok": digests_ok, "same_as_fresh_engine": same,
                                           "timings": rep["timings"]})
                print(json.dumps(report["versions"][-1]), flush=True)
    finally:
        eng.shutdown()
    print(json.dumps({"ok": ok, **report}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
