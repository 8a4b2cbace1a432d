"""RunPod serverless adapter: native, A1111 or ComfyUI job input -> GenerationRequest -> sd_core Engine -> images."""

# Output: a native job gets {"images": [{"image" (base64) | "url", "mime_type", "seed", "width", "height", "nsfw"}],
# "seed", "seeds", "model", "parameters", "timings"}; an A1111 job A1111's shape (sd_core/a1111.py), a listing its
# body (sd_core/a1111_listing.py). Errors: {"error": "<field>: <reason>"} (FAILED), plus "refresh_worker": True after
# an unrecoverable device error, so RunPod replaces this worker. docs/runpod.md.

import asyncio
import functools
import json
import logging
import time

from sd_core import a1111, a1111_listing, comfy_jobs, upscale_job
from sd_core.cpuinfo_shim import cpu_brand_in_process
from sd_core.errors import WorkerUnhealthy
from sd_core.prefetch import Prefetch
from sd_core.schema import parse_request
from sd_core.serving import Server, StepProgress, rounded, setup_logging
from sd_core.settings import Settings
from sd_core.uploads import Uploader, check_inline_size, inline_images, output_bucket

with cpu_brand_in_process():  # runpod's import asks py-cpuinfo for the CPU's name: ~1.2 s of subprocesses otherwise
    import runpod
    from runpod.serverless.modules import rp_http
    from runpod.serverless.modules.rp_logger import RunPodLogger

log = logging.getLogger("handler")
# Progress updates go to the URL RunPod gives a worker (RUNPOD_WEBHOOK_POST_OUTPUT, read by the SDK). The local modes
# (--test_input, --rp_serve_api) have none: there progress is only logged.
REMOTE_PROGRESS = rp_http.JOB_DONE_URL.startswith(("http://", "https://"))


class Worker(Server):
    """One RunPod worker: the cold start in __init__ (engine, preloaded models, output bucket), then jobs."""

    logs = "the worker logs"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.uploader: Uploader | None = None
        started = time.perf_counter()
        try:
            target = output_bucket(settings)
            self.uploader = Uploader(target) if target else None
            log.info("outputs: %s", f"uploaded to {target.describe()}" if target else "inline base64")
            prefetch = Prefetch(settings)  # the downloads start now, while torch and diffusers are imported
            from sd_core.engine import Engine  # torch + diffusers: seconds of import

            log.info("cold start: preloading %s", ", ".join(settings.models_to_preload))
            self.engine = Engine(prefetch.settings)
            self.engine.preload(prefetch)
            if self.uploader is not None:
                self.uploader.connect()  # the first job's output delivery pays no client build
            log.info("ready in %.2fs (concurrency %d)", time.perf_counter() - started, self.concurrency(1))
        except Exception as exc:  # every job then fails with the reason, and asks RunPod to replace this worker
            self.unhealthy = f"worker failed to start: {self.user_error(exc, 'cold start')}"
            log.error("%s", self.unhealthy)

    def concurrency(self, current: int) -> int:
        """RunPod's concurrency_modifier: how many jobs this worker takes at once (SD_CONCURRENCY)."""
        return max(1, self.settings.concurrency)

    async def handler(self, job: dict) -> dict:
        if self.unhealthy is not None:
            return {"error": self.unhealthy, "refresh_worker": True}
        call, name = None, f"job {job.get('id')}"
        try:
            data = job.get("input")
            if comfy_jobs.is_workflow(data):  # a ComfyUI API workflow (RunPod worker-comfyui's shape): docs/comfyui.md
                return await comfy_jobs.run_workflow(self, job, data)
            # Parsing user input is CPU work: in a thread, so one large payload never stalls the other jobs.
            call = await asyncio.to_thread(a1111.parse_call, data)
            if call is not None and call.endpoint in a1111_listing.LISTINGS:  # sd-models, samplers, ...: no GPU
                return a1111_listing.answer(call.endpoint, call.payload, self.engine)
            if (call is not None and call.endpoint == a1111.EXTRAS) or (call is None and _is_upscale(data)):
                return await self._upscale(job, call, data)
            request = await asyncio.to_thread(*((a1111.to_request, call) if call else (parse_request, data)))
            progress = StepProgress(_progress_sender(job), self.settings.progress_interval_s)
            result = await self.generate(request, progress, name=name)
            output = await asyncio.to_thread(self._output, job, call, result)
            log.info("%s: %d image(s) %dx%d, seed %d, %.2fs", name, len(result.images), result.images[0].width,
                     result.images[0].height, result.seed, result.timings.get("total_s", 0))
            return output
        except Exception as exc:
            error = self.user_error(exc, name)
            if isinstance(error, WorkerUnhealthy):
                return {"error": str(error), "refresh_worker": True}
            return {"error": a1111.rename_fields(str(error)) if call is not None else str(error)}

    async def _upscale(self, job: dict, call: a1111.A1111Call | None, data: dict) -> dict:
        """An upscale-only job (A1111 extra-single-image, or native {"upscale": {...}}): sd_core/upscale_job.py."""
        request = (upscale_job.from_extras(call.payload) if call is not None
                   else upscale_job.parse_upscale(data["upscale"]))
        result = await asyncio.to_thread(upscale_job.run_upscale, self.engine, request)
        if self.uploader is not None:
            [image] = await asyncio.to_thread(self.uploader.upload, [result.image], str(job.get("id", "job")))
        else:
            [image] = inline_images([result.image])
        if call is not None:
            output = upscale_job.to_extras_response(result, image)
        else:
            key = "image" if self.uploader is None else "url"
            output = {"images": [{key: image, "mime_type": result.image.mime_type, "width": result.image.width,
                                  "height": result.image.height}],
                      "upscaler": result.upscaler, "parameters": result.parameters, "timings": rounded(result.timings)}
        if self.uploader is None:
            check_inline_size(len(json.dumps(output)), self.settings)
        log.info("job %s: upscaled to %dx%d with %s", job.get("id"), result.image.width, result.image.height,
                 result.upscaler)
        return output

    def _output(self, job: dict, call: a1111.A1111Call | None, result) -> dict:
        """The job's output: images uploaded or inlined, in A1111's or the native shape (in a thread: CPU work)."""
        started = time.perf_counter()
        if self.uploader is not None:
            images = self.uploader.upload(result.images, str(job.get("id", "job")))
        else:
            images = inline_images(result.images)
        upload_s = time.perf_counter() - started if self.uploader is not None else None
        output = a1111.to_response(call, result, images) if call else _native_output(result, images, upload_s=upload_s)
        if self.uploader is None:
            check_inline_size(len(json.dumps(output)), self.settings)
        return output


def _is_upscale(data) -> bool:
    """A native upscale-only input: ``{"upscale": {...}}`` and nothing else."""
    return isinstance(data, dict) and set(data) == {"upscale"}


def _progress_sender(job: dict):
    """Where a job's progress updates go: RunPod's progress_update, or the log in the local modes."""
    if REMOTE_PROGRESS:
        return functools.partial(runpod.serverless.progress_update, job)
    return lambda update: log.info("job %s: step %d/%d", job.get("id"), update["step"], update["steps"])


def _native_output(result, images: list[str], *, upload_s: float | None) -> dict:
    key = "image" if upload_s is None else "url"
    entries = [{key: value, "mime_type": image.mime_type, "seed": image.seed, "width": image.width,
                "height": image.height, "nsfw": image.nsfw} for value, image in zip(images, result.images, strict=True)]
    timings = rounded(result.timings if upload_s is None else {**result.timings, "upload_s": upload_s})
    return {"images": entries, "seed": result.seed, "seeds": result.seeds, "model": result.model,
            "parameters": result.parameters, "timings": timings}


def main() -> None:
    setup_logging()
    settings = Settings.from_env().with_platform_defaults(safety_checker=False)  # RunPod: checker off unless asked
    RunPodLogger().set_level(settings.runpod_log_level)
    worker = Worker(settings)
    runpod.serverless.start({"handler": worker.handler, "concurrency_modifier": worker.concurrency})


if __name__ == "__main__":
    main()
