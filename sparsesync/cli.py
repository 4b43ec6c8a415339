"""The ``sparsesync`` command: demo, serve, push, bench.

An ordinary mistake (a missing or malformed file, a missing or short token, an address in use, a push that fails, a
version conflict, Ctrl-C) ends the command with ONE line on stderr that names the problem and the value, and a
non-zero exit status (see ``EXIT_STATUS``); ``sparsesync --debug ...`` shows the full traceback instead. The mapping
from exceptions to those lines lives in one place, :func:`describe_error`, around the subcommand dispatch in
:func:`main`.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_TOKEN_ENV = "SPARSESYNC_TOKEN"
MIN_TOKEN = 8

TOKEN_RULES = f"""\
token: serve and push authenticate each other with a shared secret of at least {MIN_TOKEN} characters (HMAC
challenge-response; the token itself never crosses the wire). It is read from the environment variable
${DEFAULT_TOKEN_ENV}, or from the variable named by --token-env NAME, or from the file given by --token-file PATH
(whitespace around the file's content is stripped). It is never taken from the command line, where other
users could read it. Example: export {DEFAULT_TOKEN_ENV}=$(openssl rand -hex 16)"""

EXIT_STATUS = """\
exit status: 0 success; 1 error (one line on stderr naming the problem; `sparsesync --debug ...` shows the
traceback); 2 bad command line; 130 interrupted (Ctrl-C)."""


class CLIError(Exception):
    """An ordinary mistake found by the command itself: reported as one line on stderr, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------------------------------
# formatting helpers (also used by sparsesync.netbench and bench/*.py)

def format_bytes(n: int | float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units); None -> '-'."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_ratio(num: float | None, den: float | None, spec: str | None = None, suffix: str = "x") -> str:
    """num/den as '250x' or '1.4x' (or with the format ``spec``, e.g. '.2f'); '-' when either side is missing or
    zero: never 'inf', never '0.0x' (a ratio that would print as zero gets two significant digits)."""
    if not num or not den:
        return "-"
    r = num / den
    text = format(r, spec) if spec else (f"{r:.0f}" if r >= 10 else f"{r:.2g}")
    if float(text) == 0:
        text = f"{r:.2g}"
    return text + suffix


# ---------------------------------------------------------------------------------------------------------------------
# inputs

def _token(args) -> str:
    """The shared token from --token-file, --token-env or $SPARSESYNC_TOKEN, checked (errors name the source)."""
    if getattr(args, "token_file", None):
        where = f"the token file {args.token_file}"
        tok = Path(args.token_file).read_text().strip()   # OSError -> "PATH: No such file or directory"
        if not tok:
            raise CLIError(f"{where} is empty")
    else:
        name = getattr(args, "token_env", None) or DEFAULT_TOKEN_ENV
        where = f"${name}" + (" (--token-env)" if getattr(args, "token_env", None) else "")
        tok = os.environ.get(name, "")
        if not tok.strip():
            raise CLIError(f"no token: ${name} is not set or empty; set it to a shared secret of at least "
                           f"{MIN_TOKEN} characters (or use --token-env NAME / --token-file PATH)")
    if len(tok.encode("utf-8")) < MIN_TOKEN:
        raise CLIError(f"the token from {where} is {len(tok)} characters long; tokens must have at least "
                       f"{MIN_TOKEN}")
    return tok


def _model_state(layers: int, hidden: int, seed: int, vocab: int) -> tuple[torch.nn.Module, dict]:
    from .models import LlamaModel, ModelConfig, bf16_snapshot
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers)
    model = LlamaModel(cfg, generator=torch.Generator().manual_seed(seed))
    return model, bf16_snapshot(model)


def _load_state(args) -> dict:
    if getattr(args, "safetensors", None):
        from .safetensors_io import load
        return load(args.safetensors)     # errors name the path (OSError.filename / InvalidArgument)
    return _model_state(args.layers, args.hidden, args.seed, args.vocab)[1]


def _add_model_args(p) -> None:
    g = p.add_argument_group("weights", "a safetensors file, or else a synthetic Llama-style model built from a seed "
                                        "(the same options on both sides give the same weights)")
    g.add_argument("--safetensors", metavar="PATH",
                   help="weights file (otherwise the model built from --layers/--hidden/--vocab/--seed)")
    g.add_argument("--layers", type=int, default=2, help="synthetic model: transformer layers (default 2)")
    g.add_argument("--hidden", type=int, default=256, help="synthetic model: hidden size (default 256)")
    g.add_argument("--vocab", type=int, default=4096, help="synthetic model: vocabulary size (default 4096)")
    g.add_argument("--seed", type=int, default=0, help="synthetic model: initialisation seed (default 0)")


def _add_token_args(p) -> None:
    g = p.add_argument_group("token (rules below)").add_mutually_exclusive_group()
    g.add_argument("--token-env", metavar="NAME",
                   help=f"read the shared token from this environment variable (default {DEFAULT_TOKEN_ENV})")
    g.add_argument("--token-file", metavar="PATH", help="read the shared token from this file")


# ---------------------------------------------------------------------------------------------------------------------
# subcommands

def cmd_serve(args) -> int:
    from .session import Receiver
    token = _token(args)
    state = _load_state(args)
    stop = {"flag": False}

    def on_update(version, st):
        how = "full update" if st.base_version is None else f"delta from v{st.base_version}"
        print(f"applied v{version} ({how}): {st.changed:,} changed, {format_bytes(st.wire_bytes)}, decode "
              f"{st.decode_seconds * 1e3:.1f} ms, apply {st.apply_seconds * 1e3:.1f} ms"
              f"{', digest verified' if st.digest_verified else ''}", flush=True)
        if args.exit_at is not None and version >= args.exit_at:
            stop["flag"] = True

    r = Receiver(state, args.listen, token=token, version=args.version, on_update=on_update,
                 verify_digest=not args.no_verify, forward_to=args.forward_to or None,
                 allow_rollback=args.allow_rollback)
    r.start()                              # OSError (address in use, ...) -> one line naming the address
    print(f"listening on {r.address} at version {r.version}", flush=True)
    if args.ready_file:
        Path(args.ready_file + ".tmp").write_text(r.address)
        os.replace(args.ready_file + ".tmp", args.ready_file)
    signal.signal(signal.SIGTERM, lambda *a: stop.update(flag=True))
    try:
        while not stop["flag"]:
            time.sleep(0.1)                # Ctrl-C: KeyboardInterrupt -> exit 130, after the save below
    finally:
        r.stop()
        if args.save:
            from .safetensors_io import save
            save(r.state, args.save)
            print(f"saved version {r.version} to {args.save}", flush=True)
    return EXIT_OK


def cmd_status(args) -> int:
    """Ask receivers what they hold (nothing is sent); exit 1 if one cannot be reached or is not at --expect."""
    from .session import probe
    token = _token(args)
    bad = 0
    for addr in args.address:
        try:
            info = probe(addr, token=token, timeout=args.timeout)
        except Exception as exc:              # noqa: BLE001 - reported per receiver
            print(f"{addr}: unreachable: {exc}")
            bad += 1
            continue
        if args.json:
            print(json.dumps(info, sort_keys=True))
        else:
            st = info.get("status")
            extra = "" if st is None else "  " + " ".join(f"{k}={st[k]}" for k in sorted(st)
                                                          if not isinstance(st[k], (dict, list)))
            print(f"{addr}: version {info['version']}  digest {info['digest']}"
                  f"{'  (empty: takes the first sender layout)' if info['adopt'] else ''}{extra}")
        if args.expect is not None and info["version"] != args.expect:
            bad += 1
    return EXIT_ERROR if bad else EXIT_OK


def cmd_info(args) -> int:
    """What this installation can do (sparsesync.build_info()); exit 1 with --require-cuda when the CUDA kernels
    cannot run here."""
    from . import __version__
    from .kernels import build_info
    info = build_info()
    if args.json:
        print(json.dumps({"version": __version__, **info}, sort_keys=True))
    else:
        def why(ok, err):
            return "yes" if ok else f"no ({err})"
        print(f"sparsesync {__version__}")
        print(f"native library: {why(info['native'], info['native_error'])}"
              f"{'  (reference kernels forced by SPARSESYNC_REFERENCE)' if info['reference_forced'] else ''}")
        print(f"CPU kernels: {info['simd'] or 'n/a'}")
        archs = ", ".join(f"sm_{a}" for a in info["cuda_archs"])
        print(f"CUDA sources compiled: {'yes, for ' + archs if info['cuda'] else 'no'}")
        print(f"CUDA kernels usable: {why(info['cuda_usable'], info['cuda_error'])}")
        print(f"NCCL backend usable: {why(info['nccl'], info['nccl_error'])}")
    return EXIT_ERROR if args.require_cuda and not info["cuda_usable"] else EXIT_OK


def cmd_push(args) -> int:
    from .errors import PushFailed
    from .session import Sender
    if args.base_version is not None and not args.base:
        raise CLIError("--base-version needs --base (the file the receivers hold at that version)", EXIT_USAGE)
    quorum = "all" if args.quorum is None else args.quorum
    if quorum != "all" and not 0 <= quorum <= len(args.to):
        raise CLIError(f"--quorum {quorum}: must be between 0 and the number of --to receivers ({len(args.to)})",
                       EXIT_USAGE)
    token = _token(args)
    state = _load_state(args)
    base = base_version = None
    if args.base:
        from .safetensors_io import load
        base = load(args.base)
        _check_same_tensors(base, state, args)
        base_version = 0 if args.base_version is None else args.base_version
        if args.base_version is None:
            print("note: assuming the receivers hold --base as version 0 (give --base-version N if they hold it "
                  "as another version)", flush=True)
    s = Sender(args.to, token=token, base=base, base_version=base_version, timeout=args.timeout, digest=True,
               streams=args.streams, compress=args.compress, quorum=quorum, allow_rollback=args.allow_rollback)
    try:
        try:
            st = s.push(state, args.version)
        except PushFailed as exc:          # the summary first, then (in main) one error line
            if exc.stats is not None:
                _report_push(exc.stats, base_version, failed=True)
            raise
    finally:
        s.close()
    _report_push(st, base_version)
    return EXIT_OK


def _check_same_tensors(base: dict, state: dict, args) -> None:
    """--base and the new weights must hold the same tensors (names, dtypes, shapes): said before connecting."""
    from .errors import LayoutMismatch
    a = {k: (v.dtype, tuple(v.shape)) for k, v in base.items()}
    b = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    if a == b:
        return
    new = f"--safetensors {args.safetensors}" if args.safetensors else "the synthetic model (--layers/--hidden/--vocab)"
    diffs = [f"{k} only in --base" for k in sorted(set(a) - set(b))] + \
            [f"{k} only in the new weights" for k in sorted(set(b) - set(a))] + \
            [f"{k}: {str(a[k][0]).replace('torch.', '')}{list(a[k][1])} in --base, "
             f"{str(b[k][0]).replace('torch.', '')}{list(b[k][1])} in the new weights"
             for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    more = "; ..." if len(diffs) > 3 else ""
    raise LayoutMismatch(f"--base {args.base} and {new} hold different tensors ({len(diffs)} difference"
                         f"{'s' if len(diffs) != 1 else ''}: {'; '.join(diffs[:3])}{more})")


def _warn(msg: str) -> None:
    print(f"sparsesync push: WARNING: {msg}", file=sys.stderr, flush=True)


def _cli_words(msg) -> str:
    """A library message in the command's terms, on one line."""
    return " ".join(str(msg).replace("allow_rollback=True", "--allow-rollback").split())


def _full_reason(p, base_version) -> str:
    if getattr(p, "note", None):
        return _cli_words(p.note)
    prev = getattr(p, "previous_version", None)
    if prev is None:
        return "its version was unknown (it could not be asked)"
    if prev == base_version:
        return (f"it claims the base version {base_version}, but its weights differ from --base (digest "
                "mismatch)")
    if p.version is not None and prev > p.version:
        return f"it was at version {prev}, newer than this push"
    return f"it was at version {prev}, not the base version {base_version}"


def _report_push(st, base_version, failed: bool = False) -> None:
    """Per peer: what it got (delta / chain / full / none) and the bytes actually sent to it; warnings on stderr
    for full updates that a delta should have covered, peers moved backwards, and (unless the push failed as a
    whole, which main reports) peers that did not reach the version."""
    v = st.version
    peers = list(st.peers)
    at_v = [p for p in peers if p.ok and p.version == v]
    kind = getattr(st, "kind", None)
    what = ("the same version again" if kind == "repush" else
            f"a full update ({st.changed:,} elements)" if kind == "full" else
            "nothing changed" if not st.changed else f"{st.changed:,} elements changed")
    sent = sum(p.bytes for p in peers)
    print(f"push v{v}: {len(at_v)}/{len(peers)} receivers at v{v}; {what}; {format_bytes(sent)} sent in all; "
          f"encode {st.encode_s:.3f} s, total {st.total_s:.3f} s")
    width = max((len(p.peer) for p in peers), default=0)
    for p in peers:
        status = "ok" if p.ok and p.version == v else "FAILED"
        have = "v?" if p.version is None else f"v{p.version}"
        line = (f"  {p.peer:{width}s}  {status:6s} {have:>5s}  {p.kind:7s} {format_bytes(p.bytes):>9s}  wire "
                f"{p.wire_s * 1e3:8.1f} ms  apply {p.apply_s * 1e3:7.1f} ms")
        if p.digest_verified:
            line += "  digest verified"
        if p.error:
            line += f"  ({_cli_words(p.error)})"
        print(line)
    sys.stdout.flush()
    delta = f"; the delta was {format_bytes(st.wire_bytes)}" if kind in (None, "delta") else ""
    for p in peers:
        prev = getattr(p, "previous_version", None)
        if p.ok and prev is not None and p.version is not None and p.version < prev:
            _warn(f"peer {p.peer} was moved BACK from version {prev} to version {p.version} (--allow-rollback): "
                  f"{p.kind} update, {format_bytes(p.bytes)}")
        elif p.ok and p.kind == "full" and base_version is not None and kind != "full":
            _warn(f"peer {p.peer} got a FULL update ({format_bytes(p.bytes)}{delta}) because "
                  f"{_full_reason(p, base_version)}")
        if not failed and not (p.ok and p.version == v):
            _warn(f"peer {p.peer} did not reach v{v}: {_cli_words(p.error or 'unknown error')}")


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
                    raise CLIError(f"receiver process exited with code {p.returncode}")
                if time.monotonic() > deadline:
                    raise CLIError("receivers did not start within 60 s")
                time.sleep(0.05)
            addrs.append(ready.read_text())
        print(f"model: {nparams:,} bf16 parameters ({nparams * 2 / 2**20:.1f} MiB); receivers: {', '.join(addrs)}")
        sender = Sender(addrs, token=token, base=state0, base_version=0, digest=True, progress=False)
        lang = SyntheticLanguage(args.vocab, seed=args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(args.seed + 1)
        hdr = (f"{'step':>4} {'loss':>7} {'changed':>9} {'density':>8} {'delta B':>9} {'B/chg':>6} {'vs dense':>8} "
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
            bpc = f"{st.wire_bytes / st.changed:6.2f}" if st.changed else f"{'-':>6}"
            notes = "".join(f" [{p.peer}: {p.error}]" for p in st.peers if not p.ok)
            notes += "".join(f" [{p.peer}: FULL update, {format_bytes(p.bytes)}]" for p in st.peers
                             if p.ok and p.kind == "full")
            print(f"{step:>4} {loss.item():7.3f} {st.changed:>9,} {100 * st.changed / nparams:7.3f}% "
                  f"{st.wire_bytes:>9,} {bpc} {format_ratio(st.dense_bytes, st.wire_bytes):>8} "
                  f"{st.encode_s * 1e3:6.1f}ms {wire * 1e3:6.1f}ms {apply * 1e3:6.1f}ms  {len(good)}/{len(st.peers)} "
                  f"digest match ({digest[:12]})" + notes)
        sender.close()
        print("all receivers hold the trainer's exact bytes at every step" if ok_all else
              "SOME RECEIVERS DID NOT MATCH")
        return EXIT_OK if ok_all else EXIT_ERROR
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


# ---------------------------------------------------------------------------------------------------------------------
# errors: one line each

def _listen_address(args) -> str:
    if getattr(args, "cmd", None) == "bench":
        return f"{getattr(args, 'listen', '?')}:{getattr(args, 'port', '?')}"
    return str(getattr(args, "listen", None) or "the listening address")


def _one_line(msg: str) -> str:
    return "; ".join(part.strip() for part in str(msg).splitlines() if part.strip()) or "(no message)"


def describe_error(exc: BaseException, args) -> tuple[str, int]:
    """(one-line message, exit status) for an exception that ended a subcommand."""
    from .errors import LayoutMismatch, PushFailed, RollbackRefused, SparseSyncError, VersionConflict
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, CLIError):
        return str(exc), exc.code
    if isinstance(exc, PushFailed):
        msg = str(exc)
        st = exc.stats
        if st is not None:
            errs = [f"{p.peer}: {p.error}" for p in st.peers if p.error and str(p.error) not in msg]
            if errs:
                msg += " (" + "; ".join(errs) + ")"
        return _cli_words(msg if msg.startswith("push") else f"push failed: {msg}"), EXIT_ERROR
    if isinstance(exc, RollbackRefused):
        return f"{exc} (pass --allow-rollback to allow moving backwards)", EXIT_ERROR
    if isinstance(exc, VersionConflict):
        return f"version conflict: {exc}", EXIT_ERROR
    if isinstance(exc, LayoutMismatch):
        return f"layout mismatch: {exc}", EXIT_ERROR
    if isinstance(exc, SparseSyncError):
        return str(exc), EXIT_ERROR
    if isinstance(exc, subprocess.CalledProcessError):
        last = _one_line((exc.stderr or "").strip().splitlines()[-1] if (exc.stderr or "").strip() else "")
        return f"{Path(str(exc.cmd[0])).name} ... exited with status {exc.returncode}: {last}", EXIT_ERROR
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return (f"address {_listen_address(args)} is already in use (another process listens there; choose "
                    "another port)"), EXIT_ERROR
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"cannot listen on {_listen_address(args)}: no such local address", EXIT_ERROR
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or exc}", EXIT_ERROR
        return str(exc.strerror or exc), EXIT_ERROR
    if isinstance(exc, ValueError):
        return str(exc), EXIT_ERROR
    return (f"internal error: {type(exc).__name__}: {exc} (run `sparsesync --debug {getattr(args, 'cmd', '')} "
            "...` for the traceback)"), EXIT_ERROR


def _dispatch(args) -> int:
    """Run the subcommand; ordinary failures become one line on stderr (the traceback only with --debug)."""
    try:
        return args.fn(args)
    except (Exception, KeyboardInterrupt) as exc:
        if args.debug:
            raise
        msg, code = describe_error(exc, args)
        try:
            print(f"sparsesync {args.cmd}: error: {_one_line(msg)}", file=sys.stderr, flush=True)
        except OSError:
            pass
        return code


# ---------------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # -v and --debug are accepted before or after the subcommand (SUPPRESS: a subcommand does not reset them)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log the library's INFO messages on stderr")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error instead of one line")
    fmt = argparse.RawDescriptionHelpFormatter      # keeps the epilogs' lines; descriptions are wrapped here

    def wrap(text: str) -> str:
        return textwrap.fill(text, 100)
    ap = argparse.ArgumentParser(prog="sparsesync", description="Exact sparse weight sync for RL.",
                                 epilog=EXIT_STATUS, formatter_class=fmt, parents=[common])
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    d = sub.add_parser("demo", parents=[common], formatter_class=fmt, epilog=EXIT_STATUS,
                       help="train a small model and sync it every step to receivers in other processes",
                       description=wrap("Train a small model on loopback and sync it every step to receivers in "
                                        "other processes, checking that every receiver holds the trainer's exact "
                                        "bytes."))
    d.add_argument("--receivers", type=int, default=2, help="receiver processes to start (default 2)")
    d.add_argument("--steps", type=int, default=5, help="training steps, one push each (default 5)")
    d.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (default 1e-6)")
    d.add_argument("--layers", type=int, default=2, help="model: transformer layers (default 2)")
    d.add_argument("--hidden", type=int, default=256, help="model: hidden size (default 256)")
    d.add_argument("--vocab", type=int, default=4096, help="model: vocabulary size (default 4096)")
    d.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("serve", parents=[common], formatter_class=fmt, epilog=TOKEN_RULES + "\n\n" + EXIT_STATUS,
                       help="run a receiver",
                       description=wrap("Hold weights and apply the updates that senders push, until Ctrl-C, "
                                        "SIGTERM or --exit-at."))
    s.add_argument("--listen", default="tcp://127.0.0.1:7000", metavar="tcp://HOST:PORT",
                   help="address to listen on (default tcp://127.0.0.1:7000, loopback only; tcp://0.0.0.0:PORT "
                        "accepts other hosts; port 0 picks a free port)")
    s.add_argument("--version", type=int, default=0, help="the version the initial weights are (default 0)")
    s.add_argument("--allow-rollback", action="store_true",
                   help="accept updates to a lower version than the one held (refused by default)")
    s.add_argument("--forward-to", action="append", metavar="tcp://HOST:PORT",
                   help="relay every applied update to this downstream receiver (repeatable)")
    s.add_argument("--ready-file", metavar="PATH", help="write the listening address to this file once listening")
    s.add_argument("--exit-at", type=int, metavar="VERSION", help="exit once this version (or a later one) is held")
    s.add_argument("--save", metavar="PATH", help="save the weights to this safetensors file on exit")
    s.add_argument("--no-verify", action="store_true", help="skip the state-digest check after each update")
    _add_model_args(s)
    _add_token_args(s)
    s.set_defaults(fn=cmd_serve)

    p = sub.add_parser("push", parents=[common], formatter_class=fmt, epilog=TOKEN_RULES + "\n\n" + EXIT_STATUS,
                       help="push weights to receivers",
                       description=wrap("Push weights as VERSION to receivers: a delta against --base where the "
                                        "receiver holds it, otherwise a chain or a full update. Prints per receiver "
                                        "what it got (delta, chain, full or none) and the bytes sent to it, and warns "
                                        "on stderr when a receiver needed a full update or was moved backwards. "
                                        "Progress goes to stderr (a redrawn line on a terminal; otherwise, after 3 s, "
                                        "a log line every 5 s)."))
    p.add_argument("--to", action="append", required=True, metavar="tcp://HOST:PORT",
                   help="receiver address (repeatable)")
    p.add_argument("--version", type=int, required=True, help="the version these weights are")
    p.add_argument("--base", metavar="PATH",
                   help="safetensors file the receivers hold (enables a delta instead of a full update)")
    p.add_argument("--base-version", type=int, metavar="N",
                   help="the version the receivers hold --base as (default 0, said in the output; needs --base)")
    p.add_argument("--quorum", type=int, metavar="N",
                   help="fail (exit 1) unless at least N receivers reach --version (default: all of them)")
    p.add_argument("--allow-rollback", action="store_true",
                   help="allow moving receivers that hold a newer version back to --version (refused by default)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="seconds to wait for a receiver, connection included (default 120)")
    p.add_argument("--streams", type=int, default=1, metavar="N",
                   help="TCP connections per receiver (long fat links; default 1)")
    p.add_argument("--compress", action="store_true", help="zstd each bucket (slow links, full updates)")
    _add_model_args(p)
    _add_token_args(p)
    p.set_defaults(fn=cmd_push)

    st = sub.add_parser("status", parents=[common], formatter_class=fmt, epilog=TOKEN_RULES + "\n\n" + EXIT_STATUS,
                        help="ask receivers what they hold",
                        description=wrap("Connect to each receiver, authenticate, and print the version and state "
                                         "digest it holds (and what an engine worker reports: applied version, last "
                                         "error). Sends no weights. Exit 1 when a receiver cannot be reached or "
                                         "does not hold --expect."))
    st.add_argument("address", nargs="+", metavar="tcp://HOST:PORT", help="receiver address (one or more)")
    st.add_argument("--expect", type=int, metavar="VERSION", help="fail unless every receiver holds this version")
    st.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                    help="seconds per receiver, connection included (default 10)")
    st.add_argument("--json", action="store_true", help="one JSON object per receiver")
    _add_token_args(st)
    st.set_defaults(fn=cmd_status)

    i = sub.add_parser("info", parents=[common], formatter_class=fmt, epilog=EXIT_STATUS,
                       help="what this installation can do (native kernels, CUDA, NCCL)",
                       description=wrap("Print what this installation can do: the native library and its CPU "
                                        "path, whether the CUDA sources were compiled and for which architectures, "
                                        "whether the CUDA kernels can run here (a device, a CUDA build of PyTorch, "
                                        "and the kernels' self-test against the CPU ones), and whether the NCCL "
                                        "backend can. Exit 1 with --require-cuda when the CUDA kernels cannot run."))
    i.add_argument("--json", action="store_true", help="one JSON object")
    i.add_argument("--require-cuda", action="store_true", help="exit 1 unless the CUDA kernels can run here")
    i.set_defaults(fn=cmd_info)

    b = sub.add_parser("bench", parents=[common], formatter_class=fmt, epilog=EXIT_STATUS,
                       help="cross-cluster bandwidth benchmark (real hosts or emulated links)",
                       description=wrap("Time one weight sync over real or emulated links: sparsesync against "
                                        "dense, dense+zstd and int32 index + raw value. Results: a table on stdout, "
                                        "and net.txt, net.json and net.png in --out DIR."))
    from .netbench import add_args
    add_args(b)
    b.set_defaults(fn=cmd_bench)
    return ap


def _configure_logging(args) -> None:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd == "push":
        # push reports every peer's outcome itself (summary on stdout, warnings on stderr): the library's own
        # warnings about the same events are shown only with -v; progress lines off a terminal always are
        logging.getLogger("sparsesync").setLevel(logging.INFO if args.verbose else logging.ERROR)
        logging.getLogger("sparsesync.progress").setLevel(logging.INFO)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)     # SUPPRESS defaults: absent unless given (see build_parser)
    args.debug = getattr(args, "debug", False)
    if not getattr(args, "fn", None):
        ap.print_help()
        return EXIT_USAGE
    _configure_logging(args)
    return _dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
