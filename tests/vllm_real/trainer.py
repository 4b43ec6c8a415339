"""The trainer of the real vLLM test, in its own process: pushes sparse updates to an engine's receiver.

    python trainer.py CKPT_DIR ADDRESS[,ADDRESS...] TOKEN      (one address per engine worker: TP ranks)

Reads one JSON command per line on stdin and answers one JSON line on stdout (prefixed ``@@ ``, so vLLM's or
torch's own stdout lines cannot be mistaken for answers):

- ``{"cmd": "push", "version": k}``: make version k from version k-1 (about 1% of the elements of some tensors
  changed by +-1 ulp through integer views; version 1 also writes a -0.0 and, in untied models, a NaN that stays) and push it with ``Sender(digest=True)``. Answer: ok, the trainer's state digest,
  per-peer kind, changed elements.
- ``{"cmd": "corrupt", "version": k}``: encode version k correctly, damage one byte of a bucket body and send it over
  a raw authenticated channel to every address. Answer: the receivers' ACKs (refused, error type).
- ``{"cmd": "wrongbase", "version": k}``: encode version k against a base that differs from what the receiver holds
  and send that delta over a raw channel. Answer: the ACK.
- ``{"cmd": "save", "dir": D}``: write the current version as a checkpoint directory (the config files of CKPT_DIR plus
  model.safetensors). ``{"cmd": "quit"}``.
"""
from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import torch

import sparsesync as ss
from sparsesync import safetensors_io, wire
from sparsesync.integrations.vllm.checkpoint import load_mirror

NAN_BITS = 0x7FC1        # a quiet NaN with a payload: bit patterns are carried exactly


def answer(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def next_version(state: dict, k: int, v0: dict) -> tuple[dict, int]:
    """Version k from version k-1: about 1% of the elements of ~40% of the tensors (at least 3) move by +-1 ulp."""
    g = torch.Generator().manual_seed(1000 + k)
    names = sorted(state)
    out = {n: t.clone() for n, t in state.items()}
    pick = torch.randperm(len(names), generator=g)[:max(3, int(0.4 * len(names)))].tolist()
    chosen = [names[i] for i in pick]
    emb = next(n for n in names if n.endswith("embed_tokens.weight"))
    if k == 1:
        chosen.append(emb)
    changed = 0
    for n in dict.fromkeys(chosen):
        t = out[n]
        bits = t.view(torch.int16).reshape(-1) if t.dtype in (torch.bfloat16, torch.float16) else \
            t.view(torch.int32).reshape(-1)
        m = max(1, bits.numel() // 40)              # 2.5% of ~40% of the tensors: about 1% of the model
        idx = torch.randperm(bits.numel(), generator=g)[:m]
        step = torch.randint(0, 2, (m,), generator=g, dtype=bits.dtype) * 2 - 1
        # +-1 ulp never crosses zero: -1 on +0.0 (0x0000) would give 0xFFFF, a NaN (and in the padding token's
        # embedding row a NaN poisons every batch on some kernels); a zero moves to the smallest denormal instead
        mag = bits[idx] & (0x7FFF if bits.dtype == torch.int16 else 0x7FFFFFFF)
        step = torch.where(mag == 0, torch.ones_like(step), step)
        bits[idx] += step
        changed += m
    if k == 1:        # a -0.0 (in a norm weight) and, where harmless, a NaN
        norm = next(n for n in names if n.endswith("norm.weight"))
        out[norm].view(torch.int16).reshape(-1)[3] = -0x8000   # 0x8000: bf16 -0.0
        changed += 1
        if "lm_head.weight" in out:
            # untied: the last embedding row belongs to a token the prompts never use (the test checks it is never
            # generated either), so the NaN stays out of every activation. With tied embeddings that row is also an
            # output row: a NaN logit makes every logprob NaN, and the NaN activations then linger in vLLM's KV-cache
            # memory after the NaN is gone (measured: reset_prefix_cache does not clear them), so a tied model gets
            # no NaN here.
            out[emb].view(torch.int16)[-1, 0] = NAN_BITS
            changed += 1
    return out, changed


def raw_send(address: str, token: str, buckets: list) -> dict:
    _, host, port = wire.parse_url(address)
    sock = socket.create_connection((host, port), timeout=10)
    ch = wire.Channel(sock, peer="raw-trainer")
    try:
        info = wire.client_handshake(ch, wire.token_bytes(token), 10)
        ch.send_msg(wire.UPDATE, {})
        for b in buckets:
            ch.send(wire.BUCKET, bytes(b))
        ch.send_msg(wire.DONE, {"cnt": len(buckets)})
        _, ack = ch.recv_msg((wire.ACK,))
        ch.send(wire.BYE)                 # a clean goodbye: the receiver logs no "connection ended" error
        return {"receiver_version_before": info.get("version"), "ack": {k: ack.get(k) for k in
                                                                         ("ok", "version", "error", "error_type")}}
    finally:
        ch.close()


def main() -> int:
    ckpt, addresses, token = sys.argv[1:4]
    addresses = addresses.split(",")
    v0 = load_mirror(ckpt)
    states = {0: v0}
    cur = 0
    sender = ss.Sender(addresses, token=token, base=v0, base_version=0, digest=True, progress=False, timeout=30)
    answer({"ready": True, "digest": ss.state_digest(v0), "tensors": len(v0),
            "elements": sum(t.numel() for t in v0.values())})
    for line in sys.stdin:
        cmd = json.loads(line)
        c = cmd["cmd"]
        try:
            if c == "quit":
                break
            if c == "push":
                k = cmd["version"]
                if k not in states:
                    states[k], changed = next_version(states[cur], k, v0)
                else:
                    changed = None
                st = sender.push(states[k], version=k)
                cur = k
                answer({"ok": st.ok, "version": k, "digest": ss.state_digest(states[k]), "changed": changed,
                        "kinds": [p.kind for p in st.peers], "errors": [p.error for p in st.peers],
                        "wire_bytes": st.wire_bytes})
            elif c in ("corrupt", "wrongbase"):
                k = cmd["version"]
                new, _ = next_version(states[cur], k, v0)
                if c == "corrupt":
                    up = ss.Encoder(base=states[cur], base_version=cur, digest=True, bucket_bytes=4096).encode(new, k)
                    buckets = [bytearray(b) for b in up.buckets]
                    victim = buckets[len(buckets) // 2]
                    victim[len(victim) * 3 // 4] ^= 0x40       # one flipped bit in a body
                else:
                    wrong = {n: t.clone() for n, t in states[cur].items()}
                    for t in wrong.values():                   # a base that differs in every tensor
                        t.view(torch.int16 if t.element_size() == 2 else torch.int32).reshape(-1)[::97] += 1
                    buckets = ss.Encoder(base=wrong, base_version=cur, digest=True).encode(new, k).buckets
                acks = [raw_send(a, token, buckets) for a in addresses]
                answer({"acks": acks, "cmd": c, "version": k, "buckets": len(buckets)})
            elif c == "save":
                d = Path(cmd["dir"])
                d.mkdir(parents=True, exist_ok=True)
                for f in Path(ckpt).iterdir():
                    if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                        shutil.copy(f, d / f.name)
                safetensors_io.save(states[cur], d / "model.safetensors")
                answer({"saved": str(d), "version": cur, "digest": ss.state_digest(states[cur])})
            else:
                answer({"error": f"unknown command {c!r}"})
        except Exception as exc:      # noqa: BLE001 - reported to the driver, which fails the test
            answer({"error": f"{type(exc).__name__}: {exc}", "cmd": c})
    sender.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
