"""Fetch progress: periodic log lines (bytes, MB/s, ETA) on the "sd_core.fetch" logger while weights download."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("sd_core.fetch")

MB = 1_000_000


def format_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / MB:.1f} MB"


def format_seconds(s: float) -> str:
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    if s >= 60:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{s:.1f}s"


class FetchProgress:
    """Counts bytes from many threads; a daemon thread logs a line every `interval` seconds while it runs.

    Lines look like ``fetch s3://b/k: 512.0 MB / 1.07 GB (48%), 431.2 MB/s, ETA 1.3s``. Short fetches (under one
    interval) log only the final summary from ``finish()``. Use as a context manager or call start()/finish().
    """

    def __init__(self, label: str, total: int | None, interval: float = 5.0, *, already: int = 0):
        self.label = label
        self.total = total
        self.interval = max(0.05, float(interval))
        self.already = already  # bytes present before this run (resumed parts, cached files): not counted in MB/s
        self._lock = threading.Lock()
        self._bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.monotonic()
        self._last_t = self.started
        self._last_b = 0

    @property
    def transferred(self) -> int:
        return self._bytes

    def add(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def start(self) -> FetchProgress:
        self.started = self._last_t = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sd-fetch-progress", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.log_line()

    def log_line(self) -> None:
        now = time.monotonic()
        b = self._bytes
        recent = (b - self._last_b) / max(now - self._last_t, 1e-9)
        self._last_t, self._last_b = now, b
        average = b / max(now - self.started, 1e-9)
        done = self.already + b
        if self.total:
            remaining = max(self.total - done, 0)
            eta = format_seconds(remaining / average) if average > 0 else "?"
            pct = 100.0 * done / self.total if self.total else 100.0
            log.info("fetch %s: %s / %s (%.0f%%), %.1f MB/s, ETA %s", self.label, format_bytes(done),
                     format_bytes(self.total), pct, recent / MB, eta)
        else:
            log.info("fetch %s: %s, %.1f MB/s", self.label, format_bytes(done), recent / MB)

    def finish(self, ok: bool = True) -> float:
        """Stop the periodic lines; log a summary when `ok`. Returns the average MB/s of this run."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1)
        seconds = max(time.monotonic() - self.started, 1e-9)
        rate = self._bytes / seconds / MB
        if ok:
            resumed = f" ({format_bytes(self.already)} already present)" if self.already else ""
            log.info("fetched %s: %s in %.2fs, %.1f MB/s%s", self.label, format_bytes(self._bytes), seconds, rate,
                     resumed)
        return rate

    def __enter__(self) -> FetchProgress:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(ok=exc_type is None)
