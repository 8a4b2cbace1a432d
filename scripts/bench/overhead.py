"""Benchmark `overhead`: a warm request through Engine.generate (and the Cog / RunPod servers) vs bare diffusers."""

from __future__ import annotations

import base64
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts.bench.common import (
    NEGATIVE,
    PROMPT,
    BenchModel,
    decode,
    log,
    make_settings,
    med,
    ms,
    pct,
    prepare_model,
    request_fields,
    seconds_of,
    server_env,
)


def bench(args, work: Path) -> dict:
    import numpy as np
    import torch

    from sd_core.engine import Engine
    from sd_core.schema import GenerationRequest

    model = prepare_model(args.model, args.model_cache)
    engine = Engine(make_settings(args, model, work))
    engine.preload()
    loaded = engine.pool.get(model.name)
    pipe = loaded.pipeline("txt2img")  # the very object the engine runs
    scheduler = loaded.scheduler(args.scheduler)  # the engine's cached scheduler for this name

    # Every call is made from one long-lived worker thread (as an async server's worker thread would): the main
    # thread measured a few % slower than a worker thread here. With batching on, the engine hands the denoising
    # to its batching thread; with batching off it runs in the calling thread, exactly where the bare call runs.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-caller")

    def bare(seed: int, steps: int | None = None):
        return worker.submit(bare_call, seed, steps).result()

    def bare_call(seed: int, steps: int | None):
        """What a hand-written worker would do with the same pipeline: one diffusers call, PIL out."""
        pipe.scheduler = scheduler
        with torch.inference_mode():
            return pipe(
                prompt=[PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=steps or args.steps,
                guidance_scale=args.guidance, width=args.size, height=args.size,
                generator=[torch.Generator("cpu").manual_seed(seed)], output_type="pil",
            ).images

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def ours(seed: int, batching: bool = True):
        def call():
            batcher = engine.batcher
            if not batching:
                engine.batcher = None  # what SD_MAX_BATCH_IMAGES=1 builds: the same engine, no batching thread
            try:
                return engine.generate(GenerationRequest(**request_fields(args, model, seed)))
            finally:
                engine.batcher = batcher

        return worker.submit(call).result()

    # Warm-up (first calls allocate, build the scheduler's tables), then choose the steps if --steps auto:
    # a call costs fixed + steps * per_step; two timed points give both, and the steps for >= --min-seconds.
    if args.steps is None:
        bare(0, steps=2)
        t2 = min(seconds_of(lambda: bare(0, steps=2))[0] for _ in range(2))
        t4 = min(seconds_of(lambda: bare(0, steps=4))[0] for _ in range(2))
        per_step = max((t4 - t2) / 2, 1e-4)
        fixed = max(t2 - 2 * per_step, 0.0)
        args.steps = max(2, min(150, math.ceil((1.2 * args.min_seconds - fixed) / per_step)))
        log(f"steps: {args.steps} (auto: {fixed * 1000:.0f} ms fixed + {per_step * 1000:.0f} ms per step; "
            f"want >= {args.min_seconds:g} s)")
    for _ in range(1 if args.quick or args.smoke else 2):
        bare(0)
        ours(0)
        ours(0, batching=False)
    log(f"setting: {model.name} {args.size}x{args.size}, {args.steps} steps, {args.scheduler}, cfg {args.guidance}, "
        f"{args.device}/{args.dtype}, batching {'on' if engine.batcher else 'off'}; {args.rounds} rounds")

    times: dict[str, list[float]] = {"bare": [], "bare+png": [], "engine": [], "engine_unbatched": []}
    cpu: dict[str, list[float]] = {"bare": [], "engine": [], "engine_unbatched": []}  # CPU time, all threads
    parts: dict[str, list[float]] = {}
    diffs = []
    variants = ["bare", "engine", "engine_unbatched"]
    for r in range(args.rounds):
        seed = 1000 + r
        pixels = {}
        for what in variants[r % 3:] + variants[:r % 3]:  # rotate the order: spread drift evenly
            c = time.process_time()
            if what == "bare":
                t, images = seconds_of(lambda seed=seed: bare(seed))
                cpu["bare"].append(time.process_time() - c)
                t_png, _ = seconds_of(lambda images=images: png(images[0]))
                times["bare"].append(t)
                times["bare+png"].append(t + t_png)
                pixels[what] = np.asarray(images[0].convert("RGB"), dtype=np.int16)
            else:
                t, result = seconds_of(lambda seed=seed, what=what: ours(seed, batching=what == "engine"))
                cpu[what].append(time.process_time() - c)
                times[what].append(t)
                if what == "engine":
                    for key, value in result.timings.items():
                        if key.endswith("_s"):
                            parts.setdefault(key, []).append(value)
                pixels[what] = decode(result.images[0].data)
        diffs.append(max(int(np.abs(pixels["bare"] - pixels[k]).max()) for k in ("engine", "engine_unbatched")))
        log(f"  round {r + 1}/{args.rounds}: bare {times['bare'][-1] * 1000:.0f} ms, engine "
            f"{times['engine'][-1] * 1000:.0f} ms, engine unbatched {times['engine_unbatched'][-1] * 1000:.0f} ms")

    out = {"model": model.name, "size": args.size, "steps": args.steps, "scheduler": args.scheduler,
           "rounds": args.rounds, "max_pixel_diff": max(diffs),
           "median_ms": {k: round(med(v) * 1000, 2) for k, v in times.items()},
           "engine_parts_ms": {k: round(med(v) * 1000, 2) for k, v in parts.items()}}
    bare_s, engine_s, unbatched_s = med(times["bare"]), med(times["engine"]), med(times["engine_unbatched"])
    out["engine_vs_bare"] = round(engine_s / bare_s, 4)
    out["engine_vs_bare_png"] = round(engine_s / med(times["bare+png"]), 4)
    out["engine_extra_ms"] = round((engine_s - bare_s) * 1000, 2)
    out["unbatched_vs_bare"] = round(unbatched_s / bare_s, 4)
    out["unbatched_extra_ms"] = round((unbatched_s - bare_s) * 1000, 2)
    out["cpu_median_ms"] = {k: round(med(v) * 1000, 2) for k, v in cpu.items()}
    out["engine_vs_bare_cpu"] = round(med(cpu["engine"]) / med(cpu["bare"]), 4)

    if args.adapters:
        out["adapters"] = {}
        for adapter in ("cog", "runpod"):
            figures = adapter_overhead(adapter, args, model, work, ours)
            if figures:
                out["adapters"][adapter] = figures

    log("")
    log(f"warm request overhead ({model.name}, {args.size}x{args.size}, {args.steps} steps, median of {args.rounds}):")
    log(f"  {'path':<44} {'ms':>8}")
    log(f"  {'bare diffusers call (PIL out)':<44} {ms(bare_s)}")
    log(f"  {'bare diffusers call + PIL PNG save':<44} {ms(med(times['bare+png']))}")
    log(f"  {'sd_core Engine.generate (PNG + infotext)':<44} {ms(engine_s)}")
    for key, value in out["engine_parts_ms"].items():
        log(f"  {'    of which ' + key:<44} {value:8.1f}")
    log(f"  {'sd_core Engine.generate, batching off':<44} {ms(unbatched_s)}")
    for figures in out.get("adapters", {}).values():
        log(f"  {figures['label']:<44} {figures['median_ms']:8.1f}   (sd_core direct alongside: "
            f"{figures['engine_median_ms']:.1f} ms)")
    log(f"  same pixels as the bare call: max difference {max(diffs)} (of 255)")
    log(f"ratio engine / bare diffusers: {out['engine_vs_bare']:.4f} ({pct(out['engine_vs_bare'])}, "
        f"{out['engine_extra_ms']:+.1f} ms); target <= +3 %")
    log(f"ratio engine / (bare + PNG save): {out['engine_vs_bare_png']:.4f} ({pct(out['engine_vs_bare_png'])})")
    log(f"ratio engine with batching off / bare (same thread): {out['unbatched_vs_bare']:.4f} "
        f"({pct(out['unbatched_vs_bare'])}, {out['unbatched_extra_ms']:+.1f} ms)")
    cpu_ms = out["cpu_median_ms"]
    log(f"ratio engine / bare in CPU time (steadier on a busy machine): {out['engine_vs_bare_cpu']:.4f} "
        f"({pct(out['engine_vs_bare_cpu'])}; {cpu_ms['engine']:.0f} vs {cpu_ms['bare']:.0f} ms)")
    for adapter, figures in out.get("adapters", {}).items():
        log(f"ratio {adapter} server / sd_core direct: {figures['vs_engine']:.4f} ({pct(figures['vs_engine'])}, "
            f"{figures['extra_ms']:+.1f} ms); vs bare diffusers: {figures['vs_engine'] * out['engine_vs_bare']:.4f}; "
            f"the adapter's own share (round trip - engine time inside the server): "
            f"{figures['around_engine_ms']:.1f} ms = {figures['around_engine_ms'] / figures['median_ms'] * 100:.2f} %")
    if bare_s < 1.0:
        log(f"note: the bare call took {bare_s * 1000:.0f} ms, under the 1 s the overhead target is defined at "
            "(raise --steps or --size)")
    return out


def adapter_overhead(adapter: str, args, model: BenchModel, work: Path, ours) -> dict | None:
    """Median HTTP round trip through an adapter's local server vs Engine.generate in this process, interleaved."""
    env = server_env(args, model, work)
    logs = work / f"{adapter}-logs"
    logs.mkdir(exist_ok=True)
    started = time.perf_counter()
    try:
        if adapter == "cog":
            from tests.fixtures.cog_server import start_cog_server

            context = start_cog_server(env, log_dir=logs)
        else:
            from tests.fixtures.runpod_server import start_runpod_server

            context = start_runpod_server(env, log_dir=logs)
        with context as server:
            if adapter == "cog":
                server.wait_for_status("READY", timeout=600)

                def idle() -> None:
                    # Cog answers a sync prediction slightly before it frees the slot: a request sent at once can
                    # get 409 Conflict. Wait (untimed) until the server says READY again.
                    server.wait_for_status("READY", timeout=60)

                def call(seed: int) -> tuple[bytes, float]:
                    body = server.predict(request_fields(args, model, seed))
                    if body.get("status") != "succeeded":
                        raise RuntimeError(f"cog prediction {body.get('status')}: {body.get('error')}")
                    data = base64.b64decode(body["output"][0].split(",", 1)[1])
                    return data, body["metrics"]["timings"]["total_s"]
            else:

                def idle() -> None:
                    pass

                def call(seed: int) -> tuple[bytes, float]:
                    body = server.runsync(request_fields(args, model, seed))
                    if body.get("status") != "COMPLETED":
                        raise RuntimeError(f"runpod job {body.get('status')}: {str(body.get('error'))[:500]}")
                    data = base64.b64decode(body["output"]["images"][0]["image"])
                    return data, body["output"]["timings"]["total_s"]

            ready_s = time.perf_counter() - started
            for _ in range(3):  # warm-up: a fresh process's first calls are slow (allocations, kernel selection)
                idle()
                call(0)
            times, direct, diffs, around = [], [], [], []
            for r in range(args.rounds):
                seed = 2000 + r
                for what in (("server", "direct") if r % 2 == 0 else ("direct", "server")):
                    if what == "server":
                        idle()
                        t, (data, inside) = seconds_of(lambda seed=seed: call(seed))
                        times.append(t)
                        around.append(t - inside)  # the adapter's own share: HTTP, JSON, base64, the platform SDK
                    else:
                        t, result = seconds_of(lambda seed=seed: ours(seed))
                        direct.append(t)
                diffs.append(int(abs(decode(data) - decode(result.images[0].data)).max()))
    except Exception as exc:  # noqa: BLE001 - a broken adapter is reported, the other figures still print
        log(f"  {adapter}: failed ({type(exc).__name__}: {exc}); see {logs}")
        return None
    label = "Cog server POST /predictions" if adapter == "cog" else "RunPod local API POST /runsync"
    server_s, direct_s = med(times), med(direct)
    figures = {"label": label, "median_ms": round(server_s * 1000, 2), "engine_median_ms": round(direct_s * 1000, 2),
               "vs_engine": round(server_s / direct_s, 4), "extra_ms": round((server_s - direct_s) * 1000, 2),
               "max_pixel_diff": max(diffs), "server_ready_s": round(ready_s, 2),
               "around_engine_ms": round(med(around) * 1000, 2)}
    log(f"  {adapter}: server ready in {ready_s:.1f} s; median {figures['median_ms']:.0f} ms vs sd_core direct "
        f"{figures['engine_median_ms']:.0f} ms; same pixels: max difference {max(diffs)}")
    return figures
