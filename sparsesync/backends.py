"""Transport backends, imported lazily by name: choosing TCP never imports NCCL.

A backend provides ``listen(host, port) -> listener`` (``accept() -> (socket, peer)``, ``close()``, ``port``) and
``connect(host, port, timeout) -> socket``. The session protocol runs over the socket either way.
"""
from __future__ import annotations

import importlib
import queue
import socket
import threading

NAMES = {"tcp": "sparsesync.backends:TCP", "inproc": "sparsesync.backends:InProc",
         "nccl": "sparsesync.nccl:NCCLBackend"}
SOCKET_BUFFER = 8 << 20


def get(name: str):
    try:
        target = NAMES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(NAMES)}") from None
    mod, attr = target.split(":")
    return getattr(importlib.import_module(mod), attr)


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TCPListener:
    def __init__(self, host: str, port: int):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(self.sock)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def accept(self):
        try:
            s, peer = self.sock.accept()
        except socket.timeout:
            return None, None
        s.settimeout(None)
        _tune(s)
        return s, f"{peer[0]}:{peer[1]}"

    def close(self) -> None:
        self.sock.close()


class TCP:
    @staticmethod
    def listen(host: str, port: int) -> _TCPListener:
        return _TCPListener(host, port)

    @staticmethod
    def connect(host: str, port: int, timeout: float) -> socket.socket:
        s = socket.create_connection((host, port), timeout=timeout)
        _tune(s)
        s.settimeout(None)
        return s


_registry: dict[str, "queue.Queue"] = {}
_registry_lock = threading.Lock()


class _InProcListener:
    def __init__(self, name: str):
        with _registry_lock:
            if name in _registry:
                raise OSError(f"inproc://{name} is already listening")
            self.q = _registry[name] = queue.Queue()
        self.name = name
        self.port = 0

    def accept(self):
        try:
            return self.q.get(timeout=0.2), f"inproc-{self.name}"
        except queue.Empty:
            return None, None

    def close(self) -> None:
        with _registry_lock:
            if _registry.get(self.name) is self.q:
                del _registry[self.name]


class InProc:
    """In-process backend for tests: a connected socketpair handed to the listener of the same name."""

    @staticmethod
    def listen(host: str, port: int) -> _InProcListener:
        return _InProcListener(host)

    @staticmethod
    def connect(host: str, port: int, timeout: float) -> socket.socket:
        with _registry_lock:
            q = _registry.get(host)
        if q is None:
            raise ConnectionRefusedError(f"nothing listens on inproc://{host}")
        a, b = socket.socketpair()
        q.put(b)
        return a
