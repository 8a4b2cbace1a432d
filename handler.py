"""RunPod serverless adapter: job input (native or A1111) -> GenerationRequest -> sd_core Engine -> images or URLs."""

# Output of a native job: {"images": [{"image": "<base64>" | "url": "<presigned URL>", "mime_type", "seed", "width",
# "height", "nsfw" (flagged by the safety checker, blacked out)}], "seed", "seeds", "model", "parameters" (A1111
# infotext), "timings"}. An A1111 job gets A1111's shape (sd_core/a1111.py). Errors come back as {"error": "<field>:
# <reason>"} (the job shows FAILED); after an unrecoverable device error also "refresh_worker": True, so RunPod
# replaces this worker. docs/runpod.md.

import asyncio
import json
import logging
import threading
import time

import runpod
from runpod.serverless.modules import rp_http
from runpod.serverless.modules.rp_logger import RunPodLogger

from sd_core import a1111
from sd_core.errors import Cancelled, SDError, WorkerUnhealthy
from sd_core.schema import parse_request
from sd_core.settings import Settings
from sd_core.uploads import Uploader, check_inline_size, inline_images, output_bucket

log = logging.getLogger("handler")


class Worker:
    """One RunPod worker: the cold start in __init__ (engine, preloaded models, output bucket), then jobs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = None
        self.uploader: Uploader | None = None
        self.broken: str | None = None  # why this worker cannot serve: every job fails with it and refreshes
        started = time.perf_counter()
        try:
            target = output_bucket(settings)
            self.uploader = Uploader(target) if target else None
            log.info("outputs: %s", f"uploaded to {target.describe()}" if target else "inline base64")
            from sd_core.engine import Engine  # torch + diffusers: seconds of import

            log.info("cold start: preloading %s", ", ".join(settings.models_to_preload))
            self.engine = Engine(settings)
            self.engine.preload()
            log.info("ready in %.2fs (concurrency %d)", time.perf_counter() - started, self.concurrency(1))
        except SDError as exc:
            self.broken = f"worker failed to start: {exc}"
            log.error("%s", self.broken)
        except Exception as exc:
            self.broken = f"worker failed to start: internal error ({type(exc).__name__}); see the worker logs"
            log.exception("cold start failed")

    def concurrency(self, current: int) -> int:
        """RunPod's concurrency_modifier: how many jobs this worker takes at once (SD_CONCURRENCY)."""
        return max(1, self.settings.concurrency)

    async def handler(self, job: dict) -> dict:
        if self.broken is not None:
            return {"error": self.broken, "refresh_worker": True}
        call = None
        try:
            data = job.get("input")
            # Parsing user input is CPU work: in a thread, so one large payload never stalls the other jobs.
            call = await asyncio.to_thread(a1111.parse_call, data)
            request = await asyncio.to_thread(*((a1111.to_request, call) if call else (parse_request, data)))
            result = await self._generate(request, job)
            t = time.perf_counter()
            if self.uploader is not None:
                images = await asyncio.to_thread(self.uploader.upload, result.images, str(job.get("id", "job")))
            else:
                images = inline_images(result.images)
            upload_s = time.perf_counter() - t
            if call is not None:
                output = a1111.to_response(call, self.engine.resolve(request)[1], result, images)
            else:
                output = _native_output(result, images, inline=self.uploader is None, upload_s=upload_s)
            if self.uploader is None:
                check_inline_size(len(json.dumps(output)), self.settings)
            log.info("job %s: %d image(s) %dx%d, seed %d, %.2fs", job.get("id"), len(result.images),
                     result.images[0].width, result.images[0].height, result.seed, result.timings.get("total_s", 0))
            return output
        except WorkerUnhealthy as exc:
            self.broken = str(exc)
            log.error("worker unhealthy, asking RunPod to replace it: %s", exc)
            return {"error": str(exc), "refresh_worker": True}
        except SDError as exc:  # the user's request, storage, or a recoverable out-of-memory: the worker goes on
            return {"error": a1111.rename_fields(str(exc)) if call is not None else str(exc)}
        except Exception as exc:
            log.exception("job %s: unexpected error", job.get("id"))
            return {"error": f"internal error ({type(exc).__name__}); see the worker logs"}

    async def _generate(self, request, job: dict):
        """engine.generate in a thread, with throttled progress updates; stops after the current step on cancel."""
        cancel = threading.Event()
        progress = Progress(job, self.settings.progress_interval_s)
        work = asyncio.ensure_future(
            asyncio.to_thread(self.engine.generate, request, on_step=progress.step, should_cancel=cancel.is_set)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:  # RunPod cancelled the job (cancel request or timeout)
            cancel.set()
            try:
                await work
            except Cancelled:
                pass
            except BaseException:
                log.exception("error while cancelling")
            log.info("job %s cancelled after step %d", job.get("id"), progress.done)
            raise


class Progress:
    """Reports denoising steps with runpod.serverless.progress_update, at most one update per `interval` seconds
    (plus the last step). The engine calls step() from its own thread.

    Updates go to the URL RunPod gives a worker (RUNPOD_WEBHOOK_POST_OUTPUT, read by the SDK). The local modes
    (--test_input, --rp_serve_api) have none, so there progress is only logged.
    """

    remote = rp_http.JOB_DONE_URL.startswith(("http://", "https://"))

    def __init__(self, job: dict, interval: float):
        self.job = job
        self.interval = interval
        self.done = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def step(self, done: int, total: int) -> None:
        with self._lock:
            self.done = done
            now = time.monotonic()
            if done < total and now - self._last < self.interval:
                return
            self._last = now
        update = {"step": done, "steps": total, "percent": 100 * done // total}
        if self.remote:
            runpod.serverless.progress_update(self.job, update)
        else:
            log.info("job %s: step %d/%d", self.job.get("id"), done, total)


def _native_output(result, images: list[str], *, inline: bool, upload_s: float) -> dict:
    key = "image" if inline else "url"
    timings = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.timings.items()}
    if not inline:
        timings["upload_s"] = round(upload_s, 4)
    return {
        "images": [
            {key: value, "mime_type": image.mime_type, "seed": image.seed, "width": image.width, "height": image.height,
             "nsfw": image.nsfw}
            for value, image in zip(images, result.images, strict=True)
        ],
        "seed": result.seed,
        "seeds": result.seeds,
        "model": result.model,
        "parameters": result.parameters,
        "timings": timings,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    settings = Settings.from_env().with_platform_defaults(safety_checker=False)  # RunPod: checker off unless asked
    RunPodLogger().set_level(settings.runpod_log_level)
    worker = Worker(settings)
    runpod.serverless.start({"handler": worker.handler, "concurrency_modifier": worker.concurrency})


if __name__ == "__main__":
    main()
