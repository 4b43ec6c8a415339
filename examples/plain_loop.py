"""A plain PyTorch training loop whose weights are pushed, sparse and exact, to an inference engine after every step.

The "engine" is a sparsesync Receiver on loopback, in a background thread, holding a bf16 copy of the initial
weights (what an engine loads from the checkpoint). The trainer keeps fp32 master weights and pushes their bf16
cast. For every step this prints the elements that changed, the bytes on the wire, and whether the receiver's
state digest equals the trainer's.

    python examples/plain_loop.py                      # a few seconds on a laptop CPU
    python examples/plain_loop.py --steps 20 --hidden 256 --layers 4

Nothing is downloaded; the model is sparsesync's small Llama-style decoder, built from a config.
"""
from __future__ import annotations

import argparse
import secrets
import sys
import time

import torch
import torch.nn.functional as F

import sparsesync as ss
import sparsesync.trainer
from sparsesync.models import LlamaModel, ModelConfig, SyntheticLanguage


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-6, help="RL-like: few bf16 weights change per step")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings (sent once)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                      max_seq_len=max(64, args.seq), multiple_of=64)
    model = LlamaModel(cfg, torch.Generator().manual_seed(args.seed))       # fp32 master weights
    if args.tied:
        model.lm_head.weight = model.embed_tokens.weight
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    lang = SyntheticLanguage(args.vocab, seed=args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)

    # --- inference side: the engine holds the checkpoint (bf16, checkpoint names) and listens on loopback ---------
    token = secrets.token_hex(16)
    engine_state = {k: v.clone() for k, v in
                    ss.trainer.checkpoint_state(model, dtype=torch.bfloat16).items()}
    receiver = ss.Receiver(engine_state, "tcp://127.0.0.1:0", token=token, version=0).start()

    # --- trainer side: one call wraps the push ------------------------------------------------------------------
    pusher = ss.trainer.wrap(model, [receiver.address], token=token, dtype=torch.bfloat16, progress=False)
    n = sum(t.numel() for t in engine_state.values())
    print(f"model: {n:,} parameters pushed as bf16 ({len(engine_state)} tensors"
          f"{', lm_head tied to the embeddings and sent once' if pusher.tied else ''}); receiver at {receiver.address}")
    print(f"{'step':>4} {'loss':>7} {'changed':>9} {'density':>8} {'wire B':>9} {'B/chg':>6} {'push ms':>8}  receiver")
    all_ok = True
    try:
        for step in range(1, args.steps + 1):
            toks = lang.batch(args.batch, args.seq + 1, data)
            logits = model(toks[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

            t0 = time.perf_counter()
            stats = pusher.push(step)                # the whole change to a training loop: this line
            ms = 1e3 * (time.perf_counter() - t0)

            receiver.wait_for(step, timeout=30)
            ok = receiver.version == step and receiver.digest() == ss.state_digest(pusher.state())
            all_ok &= ok
            per = stats.wire_bytes / stats.changed if stats.changed else float("nan")
            print(f"{step:>4} {loss.item():>7.3f} {stats.changed:>9,} {stats.changed / n:>8.3%} "
                  f"{stats.wire_bytes:>9,} {per:>6.2f} {ms:>8.1f}  v{receiver.version} "
                  f"digest {'matches' if ok else 'DIFFERS'}")
    finally:
        pusher.close()
        receiver.stop()
    print("all digests match: the receiver holds the trainer's exact bf16 weights" if all_ok
          else "MISMATCH: the receiver does not hold the trainer's weights")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
