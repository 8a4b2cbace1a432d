"""Benchmark `batch`: micro-batching throughput (images/s at 1/2/4/8 concurrent requests) vs sequential requests."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from scripts.bench.common import PROMPT, log, make_settings, med, prepare_model, request_fields, seconds_of


def bench(args, work: Path) -> dict:
    from sd_core.engine import Engine
    from sd_core.schema import GenerationRequest

    model = prepare_model(args.model, args.model_cache)
    batched = Engine(make_settings(args, model, work, max_batch_images=args.max_batch))
    alone = Engine(make_settings(args, model, work, max_batch_images=1))
    batched.preload()
    alone.preload()

    def request(i: int) -> GenerationRequest:
        return GenerationRequest(**request_fields(args, model, 5000 + i, prompt=f"{PROMPT}, variant {i}"))

    def run(engine, clients: int) -> dict:
        """`args.requests` requests from `clients` threads sending back to back; images/s and batch sizes."""
        counter = iter(range(args.requests))
        lock = threading.Lock()
        sizes, latencies, errors = [], [], []

        def client():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    t, result = seconds_of(lambda i=i: engine.generate(request(i)))
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return
                latencies.append(t)
                sizes.append(result.timings.get("batch_size", 1))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
        if errors:
            raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]!r}")
        return {"images_per_s": round(args.requests / wall, 3), "wall_s": round(wall, 3),
                "mean_batch": round(statistics.fmean(sizes), 2), "p50_latency_ms": round(med(latencies) * 1000, 1)}

    # Warm-up: each engine once, and one full batch (first calls at a new batch size allocate).
    alone.generate(request(0))
    run(batched, min(args.max_batch, max(args.levels)))
    log(f"setting: {model.name} {args.size}x{args.size}, {args.steps} steps, {args.scheduler}, "
        f"{args.requests} requests per row, SD_MAX_BATCH_IMAGES={args.max_batch}, "
        f"SD_BATCH_WAIT_MS={batched.settings.batch_wait_ms:g}, {args.device}/{args.dtype}")
    rows: dict[str, dict] = {}
    rows["sequential (batching off)"] = first = run(alone, 1)
    log(f"  sequential: {first['images_per_s']:.2f} images/s")
    for clients in args.levels:
        rows[f"{clients} concurrent, batching on"] = row = run(batched, clients)
        log(f"  {clients} concurrent: {row['images_per_s']:.2f} images/s, mean batch {row['mean_batch']}")
    if 4 in args.levels and not args.smoke:
        rows["4 concurrent, batching off"] = row = run(alone, 4)
        log(f"  4 concurrent, batching off: {row['images_per_s']:.2f} images/s")
    last = run(alone, 1)
    log(f"  sequential again: {last['images_per_s']:.2f} images/s")
    baseline = (first["images_per_s"] + last["images_per_s"]) / 2
    rows["sequential (batching off)"] = {**first, "images_per_s_again": last["images_per_s"]}

    log("")
    log(f"micro-batch throughput ({model.name} {args.size}x{args.size}, {args.steps} steps, {args.requests} requests "
        "per row; baseline = mean of the two sequential rows):")
    log(f"  {'clients':<30} {'images/s':>9} {'x seq':>7} {'mean batch':>11} {'p50 latency ms':>15}")
    for name, row in rows.items():
        row["vs_sequential"] = round(row["images_per_s"] / baseline, 3)
        log(f"  {name:<30} {row['images_per_s']:9.2f} {row['vs_sequential']:7.2f} {row['mean_batch']:11.2f} "
            f"{row['p50_latency_ms']:15.1f}")
    for clients in args.levels:
        ratio = rows[f"{clients} concurrent, batching on"]["vs_sequential"]
        target = "; target >= 1.5x" if clients == 4 else ""
        log(f"ratio {clients} concurrent (batched) / sequential: {ratio:.2f}x{target}")
    return {"model": model.name, "size": args.size, "steps": args.steps, "requests": args.requests,
            "max_batch_images": args.max_batch, "batch_wait_ms": batched.settings.batch_wait_ms,
            "baseline_images_per_s": round(baseline, 3), "rows": rows}
