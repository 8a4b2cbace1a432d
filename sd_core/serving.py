"""Serving requests on a platform: the engine off the event loop, cancellation, worker health, errors, progress."""

# Shared by predict.py (Cog) and handler.py (RunPod), which only translate between their platform and sd_core.
# Nothing here imports cog or runpod: platform specifics come in as callables (a progress `send`) or exceptions
# (any exception that interrupts `Server.generate` while the engine runs is a cancellation).

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from . import log_secrets
from .errors import Cancelled, SDError, WorkerUnhealthy
from .schema import GenerationRequest, GenerationResult

log = logging.getLogger("sd_core.serving")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """INFO and above to stderr in one format, replacing whatever handlers the platform's SDK installed; URL
    credentials and query strings are removed from every line (``log_secrets``)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    log_secrets.install()


def rounded(timings: dict[str, float]) -> dict[str, float]:
    """Timings as users see them: seconds rounded to 0.1 ms; counts (batch_size) as they are."""
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in timings.items()}


class StepProgress:
    """Denoising progress for ``send(update)`` (update: step, steps, percent): at most one update per ``interval``
    seconds, plus the last step. The engine calls step() from its own threads."""

    def __init__(self, send: Callable[[dict], None], interval: float = 0.0):
        self.send = send
        self.interval = interval
        self.done = self.total = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def step(self, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total = done, total
            now = time.monotonic()
            if done < total and now - self._last < self.interval:
                return
            self._last = now
        self.send({"step": done, "steps": total, "percent": 100 * done // max(total, 1)})


class Server:
    """One worker's engine and health, as both adapters serve it (RunPod's Worker is one; Cog's Runner holds one).

    The defaults are class attributes, so a worker whose cold start failed (no engine) still answers with its reason.
    """

    engine = None  # the sd_core Engine, once the cold start has made it
    unhealthy: str | None = None  # why this worker cannot serve any more (failed cold start, device error)
    logs = "the logs"  # where an internal error's message sends the user

    def __init__(self, engine=None):
        self.engine = engine

    async def generate(self, request: GenerationRequest, progress: StepProgress | None = None, *,
                       name: str = "request") -> GenerationResult:
        """engine.generate in a thread, so the event loop stays free. When the platform cancels (asyncio's
        CancelledError, Cog's CancelationException, ...), the engine stops at its next step boundary; the
        cancellation is re-raised only once the engine has stopped."""
        progress = progress or StepProgress(lambda update: None)
        cancel = threading.Event()
        work = asyncio.ensure_future(
            asyncio.to_thread(self.engine.generate, request, on_step=progress.step, should_cancel=cancel.is_set)
        )
        try:
            return await asyncio.shield(work)
        except BaseException:
            if work.done():  # the engine's own outcome (an error): nothing is running any more
                raise
            cancel.set()
            try:
                await work
            except Cancelled:
                pass
            except BaseException:  # cancelled either way; keep the reason in the logs
                log.exception("%s: error while cancelling", name)
            log.info("%s cancelled: generation stopped after step %d of %d", name, progress.done, progress.total)
            raise

    def user_error(self, error: Exception, name: str = "request") -> SDError:
        """The one error mapping of both platforms: what to tell the user about ``error``.

        SDError: itself (``"<field>: <reason>"``). WorkerUnhealthy: itself, and this worker is marked unhealthy (Cog's
        health check fails from now on; RunPod gets ``refresh_worker``). Anything else: ``internal error (<Type>);
        see the logs``, with its traceback logged (never shown to the user).
        """
        if isinstance(error, WorkerUnhealthy):
            self.unhealthy = str(error)
            log.error("%s: worker unhealthy, it must be replaced: %s", name, error)
        elif not isinstance(error, SDError):
            log.error("%s: unexpected error", name, exc_info=error)
            return SDError(f"internal error ({type(error).__name__}); see {self.logs}")
        return error
