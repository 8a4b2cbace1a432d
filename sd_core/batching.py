"""Micro-batching: concurrent compatible requests share one denoising call, each keeping its own seeds and prompt."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

from .denoise import Denoiser
from .jobs import Job
from .settings import Settings

log = logging.getLogger("sd_core.batching")


class MicroBatcher:
    """Queues jobs from many threads; one dispatcher thread runs compatible ones together.

    While the GPU is busy, new jobs wait in the queue; the next round takes every queued job whose batch_key
    matches the oldest one, up to SD_MAX_BATCH_IMAGES images. It waits for more (at most SD_BATCH_WAIT_MS) only while
    some requests in progress are not in the queue (see ``request``): a lone request never waits. A failing batch is
    re-run one job at a time, so one bad request never fails its batch-mates. Each image keeps its own seeded noise;
    batched pixels may still differ from the same request run alone by 1-2 levels (batch-size dependent kernels).
    """

    def __init__(self, denoiser: Denoiser, settings: Settings):
        self._denoiser = denoiser
        self.max_images = settings.max_batch_images
        self.max_wait_s = settings.batch_wait_ms / 1000
        self._pending: list[tuple[Job, Future]] = []
        self._active = 0  # generate() calls in progress (inside ``request``), queued or not
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Wrap a whole generate() call. A batch being formed waits only while some of these are not in the queue:
        being prepared, or finishing the images of the previous batch (their clients may send the next request at
        once; waiting for them keeps concurrent clients in step). With nobody else in progress it starts at once."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # a batch waiting for this request may stop waiting

    def run(self, job: Job) -> list:
        """Run ``job`` (possibly batched with others) and return its images; blocks the calling thread."""
        if job.batch_key is None:
            return self._denoiser.run([job])[0]
        future: Future = Future()
        with self._cond:
            self._pending.append((job, future))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._dispatch, name="sd-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return future.result()

    def _take_batch(self) -> list[tuple[Job, Future]]:
        """Wait for work, then take the oldest job and every compatible queued job that fits (lock held)."""
        while not self._pending:
            self._cond.wait()
        key = self._pending[0][0].batch_key
        deadline = time.monotonic() + self.max_wait_s
        while True:
            batch, images = [], 0
            for item in self._pending:
                if item[0].batch_key == key and images + len(item[0].seeds) <= self.max_images:
                    batch.append(item)
                    images += len(item[0].seeds)
            remaining = deadline - time.monotonic()
            if images >= self.max_images or remaining <= 0 or self._active <= len(self._pending):
                break
            self._cond.wait(remaining)
        if not batch:  # the oldest job alone is larger than max_images: run it by itself
            batch = [self._pending[0]]
        for item in batch:
            self._pending.remove(item)
        return batch

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                batch = self._take_batch()
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Job, Future]]) -> None:
        jobs = [job for job, _ in batch]
        try:
            results = self._denoiser.run(jobs)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the waiting callers
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("batch of %d failed (%s); running its jobs one by one", len(batch), type(exc).__name__)
            for item in batch:
                self._run_batch([item])
            return
        if len(batch) > 1:
            log.info("ran %d requests (%d images) as one batch", len(batch), sum(len(j.seeds) for j in jobs))
        for (_, future), images in zip(batch, results, strict=True):
            future.set_result(images)
