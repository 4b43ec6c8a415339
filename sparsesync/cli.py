"""The ``sparsesync`` command: demo, serve, push, bench."""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _token(args) -> str | None:
    if getattr(args, "token_file", None):
        return Path(args.token_file).read_text().strip()
    if getattr(args, "token_env", None):
        tok = os.environ.get(args.token_env)
        if not tok:
            raise SystemExit(f"environment variable {args.token_env} is empty or unset")
        return tok
    return None


def _model_state(layers: int, hidden: int, seed: int, vocab: int) -> tuple[torch.nn.Module, dict]:
    from .models import LlamaModel, ModelConfig, bf16_snapshot
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers)
    model = LlamaModel(cfg, generator=torch.Generator().manual_seed(seed))
    return model, bf16_snapshot(model)


def _load_state(args) -> dict:
    if getattr(args, "safetensors", None):
        from .safetensors_io import load
        return load(args.safetensors)
    return _model_state(args.layers, args.hidden, args.seed, args.vocab)[1]


def _add_model_args(p) -> None:
    p.add_argument("--safetensors", help="weights file (otherwise a model built from --layers/--hidden/--seed)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)


def _add_token_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token-env", default="SPARSESYNC_TOKEN", help="read the shared token from this variable")
    g.add_argument("--token-file", help="read the shared token from this file")


# ---------------------------------------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from .session import Receiver
    state = _load_state(args)
    stop = {"flag": False}

    def on_update(version, st):
        print(f"applied v{version}: {st.changed} changed, {st.wire_bytes} B, decode {st.decode_seconds * 1e3:.1f} ms,"
              f" apply {st.apply_seconds * 1e3:.1f} ms{', digest verified' if st.digest_verified else ''}",
              flush=True)
        if args.exit_at is not None and version >= args.exit_at:
            stop["flag"] = True

    r = Receiver(state, args.listen, token=_token(args), version=args.version, on_update=on_update,
                 verify_digest=not args.no_verify, forward_to=args.forward_to or None)
    r.start()
    print(f"listening on {r.address} at version {r.version}", flush=True)
    if args.ready_file:
        Path(args.ready_file + ".tmp").write_text(r.address)
        os.replace(args.ready_file + ".tmp", args.ready_file)
    signal.signal(signal.SIGTERM, lambda *a: stop.update(flag=True))
    try:
        while not stop["flag"]:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        r.stop()
        if args.save:
            from .safetensors_io import save
            save(r.state, args.save)
    return 0


def cmd_push(args) -> int:
    from .session import Sender
    state = _load_state(args)
    base = None
    if args.base:
        from .safetensors_io import load
        base = load(args.base)
    s = Sender(args.to, token=_token(args), base=base, base_version=args.base_version if base is not None else None,
               timeout=args.timeout, digest=True, streams=args.streams, compress=args.compress)
    st = s.push(state, args.version)
    _print_push(st)
    s.close()
    return 0 if st.ok else 1


def _print_push(st) -> None:
    print(st)
    for p in st.peers:
        print(f"  {p.peer:28s} {'ok ' if p.ok else 'ERR'} v{p.version} {p.kind:5s} {p.bytes:>12d} B  wire "
              f"{p.wire_s * 1e3:8.1f} ms  apply {p.apply_s * 1e3:7.1f} ms"
              f"{'  digest verified' if p.digest_verified else ''}{'  ' + p.error if p.error else ''}")


def cmd_demo(args) -> int:
    from .digest import state_digest
    from .models import SyntheticLanguage, bf16_snapshot
    from .session import Sender
    token = secrets.token_hex(16)
    tmp = Path(tempfile.mkdtemp(prefix="sparsesync-demo-"))
    env = dict(os.environ, SPARSESYNC_TOKEN=token)
    procs = []
    print(f"sparsesync demo: {args.receivers} receiver process(es) on loopback, model layers={args.layers} "
          f"hidden={args.hidden}, {args.steps} steps of AdamW lr={args.lr}")
    try:
        for i in range(args.receivers):
            ready = tmp / f"recv{i}.addr"
            cmd = [sys.executable, "-m", "sparsesync.cli", "serve", "--listen", "tcp://127.0.0.1:0", "--layers",
                   str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--seed",
                   str(args.seed), "--ready-file", str(ready), "--exit-at", str(args.steps)]
            procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if not args.verbose else None),
                          ready))
        model, state0 = _model_state(args.layers, args.hidden, args.seed, args.vocab)
        nparams = sum(t.numel() for t in state0.values())
        addrs = []
        deadline = time.monotonic() + 60
        for p, ready in procs:
            while not ready.exists():
                if p.poll() is not None:
                    raise SystemExit(f"receiver process exited with code {p.returncode}")
                if time.monotonic() > deadline:
                    raise SystemExit("receivers did not start within 60 s")
                time.sleep(0.05)
            addrs.append(ready.read_text())
        print(f"model: {nparams:,} bf16 parameters ({nparams * 2 / 2**20:.1f} MiB); receivers: {', '.join(addrs)}")
        sender = Sender(addrs, token=token, base=state0, base_version=0, digest=True, progress=False)
        lang = SyntheticLanguage(args.vocab, seed=args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(args.seed + 1)
        hdr = (f"{'step':>4} {'loss':>7} {'changed':>9} {'density':>8} {'wire B':>9} {'B/chg':>6} {'vs dense':>8} "
               f"{'encode':>8} {'wire':>8} {'apply':>8}  receivers")
        print(hdr)
        ok_all = True
        for step in range(1, args.steps + 1):
            toks = lang.batch(4, 64, g)
            logits = model(toks[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            snap = bf16_snapshot(model)
            st = sender.push(snap, step)
            digest = state_digest(snap)
            good = [p for p in st.peers if p.ok and p.version == step and p.digest_verified]
            ok_all &= len(good) == len(st.peers)
            wire = max((p.wire_s for p in st.peers), default=0.0)
            apply = max((p.apply_s for p in st.peers), default=0.0)
            bpc = st.wire_bytes / st.changed if st.changed else 0.0
            print(f"{step:>4} {loss.item():7.3f} {st.changed:>9,} {100 * st.changed / nparams:7.3f}% "
                  f"{st.wire_bytes:>9,} {bpc:6.2f} {st.dense_bytes / st.wire_bytes:7.0f}x {st.encode_s * 1e3:6.1f}ms "
                  f"{wire * 1e3:6.1f}ms {apply * 1e3:6.1f}ms  {len(good)}/{len(st.peers)} digest match "
                  f"({digest[:12]})" + "".join(f" [{p.peer}: {p.error}]" for p in st.peers if not p.ok))
        sender.close()
        print("all receivers hold the trainer's exact bytes at every step" if ok_all else
              "SOME RECEIVERS DID NOT MATCH")
        return 0 if ok_all else 1
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.terminate()
        for p, _ in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def cmd_bench(args) -> int:
    from .netbench import main as bench_main
    return bench_main(args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sparsesync", description="Exact sparse weight sync for RL.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd")

    d = sub.add_parser("demo", help="train a small model and sync it every step to receivers in other processes")
    d.add_argument("--receivers", type=int, default=2)
    d.add_argument("--steps", type=int, default=5)
    d.add_argument("--lr", type=float, default=1e-6)
    d.add_argument("--layers", type=int, default=2)
    d.add_argument("--hidden", type=int, default=256)
    d.add_argument("--vocab", type=int, default=4096)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("serve", help="run a receiver")
    s.add_argument("--listen", default="tcp://127.0.0.1:7000",
                   help="address to listen on (default loopback; use tcp://0.0.0.0:PORT to accept other hosts)")
    s.add_argument("--version", type=int, default=0, help="version the initial weights are")
    s.add_argument("--forward-to", action="append", help="relay every update to this downstream receiver")
    s.add_argument("--ready-file", help="write the listening address to this file once ready")
    s.add_argument("--exit-at", type=int, help="exit after reaching this version")
    s.add_argument("--save", help="save the weights to this safetensors file on exit")
    s.add_argument("--no-verify", action="store_true", help="skip the state-digest check after each update")
    _add_model_args(s)
    _add_token_args(s)
    s.set_defaults(fn=cmd_serve)

    p = sub.add_parser("push", help="push weights to receivers")
    p.add_argument("--to", action="append", required=True, help="receiver address tcp://HOST:PORT (repeatable)")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--base", help="safetensors file the receivers hold (enables a delta instead of a full update)")
    p.add_argument("--base-version", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--streams", type=int, default=1, help="TCP connections per receiver (long fat links)")
    p.add_argument("--compress", action="store_true", help="zstd each bucket (slow links, full updates)")
    _add_model_args(p)
    _add_token_args(p)
    p.set_defaults(fn=cmd_push)

    b = sub.add_parser("bench", help="cross-cluster bandwidth benchmark (real hosts or emulated links)")
    from .netbench import add_args
    add_args(b)
    b.set_defaults(fn=cmd_bench)

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not getattr(args, "fn", None):
        ap.print_help()
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
