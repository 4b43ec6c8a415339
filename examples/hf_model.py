"""A Hugging Face model trained on CPU and pushed, sparse and exact, to a receiver that loaded its checkpoint.

1. Build a tiny ``LlamaForCausalLM`` from a config (``tie_word_embeddings=True``; nothing is downloaded) and save it
   in bf16 with ``save_pretrained``: its safetensors has no ``lm_head.weight``, because the head is tied.
2. The inference side loads that safetensors file with ``sparsesync.safetensors_io.load`` (checkpoint coordinates)
   and serves it with a ``Receiver`` on loopback.
3. The trainer keeps fp32 master weights, trains a few AdamW steps, and pushes the bf16 cast after each step with
   ``sparsesync.trainer.wrap(model, ...)``: the tied head goes once, as ``model.embed_tokens.weight``.
4. At the end the trainer saves its checkpoint again; the receiver's state equals it bit for bit.

    pip install transformers            # not a sparsesync dependency
    python examples/hf_model.py [--steps 5]
"""
from __future__ import annotations

import argparse
import copy
import secrets
import sys
import tempfile
from pathlib import Path

import torch

import sparsesync as ss
import sparsesync.safetensors_io
import sparsesync.trainer


def save_bf16(model, path: Path) -> dict:
    """``save_pretrained`` of a bf16 copy (what an RL run hands its engines), read back as checkpoint tensors."""
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    files = sorted(path.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(ss.safetensors_io.load(f))
    return state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-6, help="RL-like: few bf16 weights change per step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("examples/hf_model.py needs Hugging Face transformers, which sparsesync does not depend on: "
              "pip install transformers", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():          # fp32 master weights that start exactly at the bf16 checkpoint's values
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    with tempfile.TemporaryDirectory(prefix="sparsesync-hf-") as d:
        return run(args, model, cfg, Path(d))


def run(args, model, cfg, tmp: Path) -> int:
    import transformers
    # --- inference side: the checkpoint as an engine loads it ---------------------------------------------------
    engine_state = save_bf16(model, tmp / "v0")
    print(f"transformers {transformers.__version__}: checkpoint {tmp / 'v0'} has {len(engine_state)} tensors; "
          f"lm_head.weight in it: {'lm_head.weight' in engine_state}")
    token = secrets.token_hex(16)
    receiver = ss.Receiver(engine_state, "tcp://127.0.0.1:0", token=token, version=0).start()

    # --- trainer side ------------------------------------------------------------------------------------------
    pusher = ss.trainer.wrap(model, [receiver.address], token=token, dtype=torch.bfloat16, progress=False)
    print(f"pusher: {len(pusher.names)} tensors; tied and sent once: {pusher.tied}")
    same_names = sorted(pusher.names) == sorted(engine_state)
    same_bytes = ss.state_digest(pusher.state()) == receiver.digest()
    print(f"trainer state in checkpoint coordinates == checkpoint: names {same_names}, bytes {same_bytes}")
    if not (same_names and same_bytes):
        print("the trainer's checkpoint state does not match the saved checkpoint", file=sys.stderr)
        return 1

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    ok = True
    try:
        for step in range(1, args.steps + 1):
            ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stats = pusher.push(step)
            receiver.wait_for(step, timeout=30)
            match = receiver.digest() == ss.state_digest(pusher.state())
            ok &= match
            print(f"step {step}: loss {loss.item():.3f}, {stats.changed:,} elements changed, {stats.wire_bytes:,} B "
                  f"on the wire, receiver v{receiver.version}, digest {'matches' if match else 'DIFFERS'}")
    finally:
        pusher.close()
        receiver.stop()

    final = save_bf16(model, tmp / "final")        # what save_pretrained writes for the trained model
    equal = ss.state_digest(final) == ss.state_digest(receiver.state)
    print(f"receiver == the trainer's final checkpoint (save_pretrained, bf16): {equal}")
    return 0 if ok and equal else 1


if __name__ == "__main__":
    sys.exit(main())
