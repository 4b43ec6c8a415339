"""Progress of a long transfer (a push): one redrawn line on a terminal, periodic log lines elsewhere.

On a terminal (``stream.isatty()``) the line ``push v7:   12.3 MiB sent, 1/3 peers done`` is redrawn in place with
``\\r``. Anywhere else (a log file, a pipe, a job scheduler's output) there is no ``\\r`` soup: once the operation has
lasted ``delay`` seconds, a line is logged every ``interval`` seconds at INFO on the ``sparsesync.progress`` logger (a
child of ``sparsesync``, so configuring that one is enough), and one final line at :meth:`Progress.close`. Short
operations print nothing at all.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable, TextIO

log = logging.getLogger("sparsesync.progress")

REDRAW_S = 0.2          # terminal: at most one redraw per this many seconds (plus one when a peer finishes)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):   # no isatty, or a closed stream
        return False


class Progress:
    """Progress of sending to ``total_peers`` peers, fed by :meth:`add` (thread-safe) and ended by :meth:`close`.

    ``enabled``: ``False`` shows nothing; ``None`` or ``True`` redraws one line when ``stream`` is a terminal and
    logs periodic lines otherwise. ``stream``: default ``sys.stderr``. ``interval``: seconds between log lines.
    ``delay``: no log line before the operation has lasted this long. ``clock``: a monotonic clock in seconds
    (tests pass a fake one); ``logger``: where log lines go (default ``logging.getLogger("sparsesync.progress")``).
    """

    def __init__(self, label: str, total_peers: int, *, enabled: bool | None = None, stream: TextIO | None = None,
                 interval: float = 5.0, delay: float = 3.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None):
        self.label = label
        self.total_peers = total_peers
        self.stream = sys.stderr if stream is None else stream
        self.interval = float(interval)
        self.delay = float(delay)
        self.clock = clock
        self.logger = log if logger is None else logger
        if enabled is False:
            self.mode = "off"
        else:
            self.mode = "tty" if _isatty(self.stream) else "log"
        self.sent = 0
        self.done = 0
        self.lines = 0                  # lines drawn (tty) or logged (log)
        self.closed = False
        self._start = clock()
        self._last = None               # time of the last redraw / log line
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None
        if self.mode == "log":          # logs also while nothing moves (a stalled peer is when one wants to know)
            self._ticker = threading.Thread(target=self._tick_loop, name="sparsesync-progress", daemon=True)
            self._ticker.start()

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _text(self, width: int = 9) -> str:
        return f"{self.label}: {self.sent / 2**20:{width}.1f} MiB sent, {self.done}/{self.total_peers} peers done"

    def add(self, nbytes: int = 0, done: int = 0) -> None:
        """Count ``nbytes`` more bytes sent and ``done`` more peers finished."""
        if self.mode == "off":
            return
        with self._lock:
            if self.closed:
                return
            self.sent += nbytes
            self.done += done
            now = self.clock()
            if self.mode == "tty":
                if done or self._last is None or now - self._last > REDRAW_S:
                    self._last = now
                    self.lines += 1
                    self._write("\r" + self._text() + " ")
            else:
                self._maybe_log(now)

    def poll(self) -> None:
        """Log a line now if one is due (the background ticker calls this; tests with a fake clock may too)."""
        if self.mode != "log":
            return
        with self._lock:
            if not self.closed:
                self._maybe_log(self.clock())

    def close(self) -> None:
        """End the display: a newline after a redrawn line, a final log line if any was logged. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.mode == "tty" and self.lines:
                self._write("\n")
            elif self.mode == "log" and self.lines:
                self.logger.info("%s: finished after %.1f s, %.1f MiB sent, %d/%d peers done", self.label,
                                 self.clock() - self._start, self.sent / 2**20, self.done, self.total_peers)
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(1.0)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------------------------
    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):       # a closed or broken stream must not fail the transfer
            pass

    def _maybe_log(self, now: float) -> None:
        """Called with the lock held."""
        elapsed = now - self._start
        if elapsed < self.delay:
            return
        if self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        self.lines += 1
        self.logger.info("%s (%.0f s)", self._text(0), elapsed)

    def _tick_loop(self) -> None:
        step = max(0.01, min(0.5, self.interval / 4, self.delay / 4 if self.delay > 0 else 0.5))
        while not self._stop.wait(step):
            self.poll()
