"""Benchmark `coldstart`: process start -> ready (python, imports, fetch, load, warm-up) -> first image, from a warm
cache vs from S3, and the first request after ready vs a warm request (target <= 1.2x), with the warm-up on vs off."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts.bench.common import ARCH, PROMPT, ROOT, BenchModel, log, med, prepare_model, seconds_of

CHILD_TAG = "COLDSTART_JSON "


def coldstart_child(args) -> int:
    """Runs in a fresh process: time each cold-start phase, print them as one JSON line.

    --mode split: the phases one after another (import diffusers, fetch, load), to see what each costs;
    --mode preload: what the adapters do (a Prefetch started before torch is imported, then
    Engine(settings).preload(prefetch): the downloads overlap the imports, then the warm-up generation unless
    SD_WARMUP=0).
    Then the first request, and the same request again (a warm request), side by side in the one process.
    """
    marks = {"main": time.time()}
    from sd_core.settings import Settings

    settings = Settings.from_env()
    prefetch = None
    if args.mode == "preload":  # as the adapters start: the downloads begin before torch is imported
        from sd_core.prefetch import Prefetch

        prefetch = Prefetch(settings)
        settings = prefetch.settings
    import sd_core.engine  # torch, pydantic, our modules

    marks["import_sd_core"] = time.time()
    from sd_core.schema import GenerationRequest
    if args.mode == "split":
        import diffusers

        getattr(diffusers, "StableDiffusionXLPipeline" if args.arch == "sdxl" else "StableDiffusionPipeline")
        marks["import_diffusers"] = time.time()
    engine = sd_core.engine.Engine(settings)
    marks["engine"] = time.time()
    if args.mode == "split":
        from sd_core.manifests import fetch_model

        fetch_model(engine.catalog.get(args.name), settings)
        marks["fetch"] = time.time()
    timings = engine.preload(prefetch)  # split: the fetch above filled the cache: the load (plus a cache lookup)
    marks["load" if args.mode == "split" else "preload"] = time.time()
    request = GenerationRequest(prompt=PROMPT, model=args.name, width=args.size, height=args.size,
                                num_inference_steps=2, seed=1)
    engine.generate(request)
    marks["first_request"] = time.time()
    engine.generate(request)
    marks["warm_request"] = time.time()
    marks["warmup_s"] = timings.get("warmup", 0.0)  # a duration (inside preload), not a time mark
    print(CHILD_TAG + json.dumps(marks), flush=True)
    return 0


COLD_LABELS = {
    "python": "python start", "import_sd_core": "import sd_core.engine (torch)",
    "import_diffusers": "import diffusers pipeline", "engine": "Engine() (manifests, device)",
    "fetch": "fetch (cache hit / S3 download)", "load": "load pipeline", "ready_split": "= ready, phases in a row",
    "preload": "Engine.preload (fetch || import, load, warm-up)", "warmup": "  of which the warm-up",
    "ready": "= ready, as the adapters start", "first_request": "first request (2 steps), after ready",
    "first_image": "= process start -> first image", "warm_request": "the same request again (warm)",
}
SOURCES = {"warm": "warm cache", "s3": "from S3", "nowarmup": "no warm-up"}  # columns: the last is a warm cache


def bench(args, work: Path) -> dict:
    from tests.fixtures.s3 import SeaweedFS

    model = prepare_model(args.model, args.model_cache)
    models_dir = model.models_dir(work / "models-s3", pinned=True)
    files = [p for p in sorted((model.bucket / model.folder).rglob("*")) if p.is_file()]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    runs: dict[tuple[str, str], list[dict]] = {}
    with SeaweedFS(work / "seaweedfs") as s3:
        bucket = s3.make_bucket("bench")
        client = s3.client()
        t, _ = seconds_of(lambda: [client.upload_file(str(p), bucket, p.relative_to(model.bucket).as_posix())
                                   for p in files])
        log(f"uploaded {model.name} ({len(files)} files, {size_mb:.0f} MB) to the local S3 server in {t:.1f} s")
        env = {**os.environ, **s3.env, "SD_MODELS_DIR": str(models_dir), "SD_WEIGHTS_URI": f"s3://{bucket}",
               "SD_DEVICE": args.device, "SD_DTYPE": args.dtype, "SD_PRELOAD_MODELS": model.name,
               "SD_DEFAULT_MODEL": model.name, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        modes = ("preload",) if args.smoke else ("split", "preload")
        for r in range(args.rounds):
            for mode in modes:
                cache = work / f"coldstart-cache-{r}-{mode}"
                for source in ("s3", "warm"):  # the warm run reuses the cache the S3 run just filled
                    # with the overlap on (off by default until it measures faster), compared below with it off
                    marks = run_child(args, model, mode, {**env, "SD_CACHE_DIR": str(cache), "SD_OVERLAP_LOAD": "1"})
                    runs.setdefault((source, mode), []).append(marks)
                    detail = (f"fetch {marks['fetch']:.2f} s, load {marks['load']:.2f} s" if mode == "split"
                              else f"preload {marks['preload']:.2f} s")
                    log(f"  round {r + 1}/{args.rounds} {source:>4} {mode:>7}: ready in {marks['ready']:.2f} s "
                        f"({detail})")
                if mode == "preload":  # side by side: from S3 with SD_OVERLAP_LOAD off (the folder loaded at once)
                    fresh = work / f"coldstart-cache-{r}-nooverlap"
                    marks = run_child(args, model, mode, {**env, "SD_CACHE_DIR": str(fresh), "SD_OVERLAP_LOAD": "0"})
                    runs.setdefault(("nooverlap", mode), []).append(marks)
                    log(f"  round {r + 1}/{args.rounds}   s3 preload, SD_OVERLAP_LOAD=0: ready in "
                        f"{marks['ready']:.2f} s")
                    shutil.rmtree(fresh, ignore_errors=True)
                if mode == "preload":  # side by side: the same warm cache, the warm-up off
                    marks = run_child(args, model, mode, {**env, "SD_CACHE_DIR": str(cache), "SD_WARMUP": "0"})
                    runs.setdefault(("nowarmup", mode), []).append(marks)
                    log(f"  round {r + 1}/{args.rounds} warm, no warm-up: ready in {marks['ready']:.2f} s, first "
                        f"request {marks['first_request']:.2f} s")
                shutil.rmtree(cache, ignore_errors=True)
    summary: dict[str, dict[str, float]] = {}
    nan = float("nan")
    for source in SOURCES:
        split = {k: med(v) for k, v in _columns(runs.get((source, "split"), [])).items()}
        real = {k: med(v) for k, v in _columns(runs[(source, "preload")]).items()}
        row = {k: split.get(k, nan) for k in ("python", "import_sd_core", "import_diffusers", "engine", "fetch",
                                               "load")}
        row.update(ready_split=split.get("ready", nan), preload=real["preload"], warmup=real["warmup"],
                   ready=real["ready"], first_request=real["first_request"], first_image=real["first_image"],
                   warm_request=real["warm_request"])
        summary[source] = {k: round(v, 3) for k, v in row.items()}
    log("")
    log(f"cold start, process start -> ready -> first image ({model.name}, {size_mb:.0f} MB, "
        f"{args.device}/{args.dtype}, requests {args.size}x{args.size}; median of {args.rounds}; seconds):")
    log(f"  {'phase':<48} {'warm cache':>11} {'from S3':>9} {'no warm-up':>11}")
    def cell(value: float, width: int) -> str:
        return f"{value:{width}.2f}" if math.isfinite(value) else " " * (width - 1) + "-"

    for key, label in COLD_LABELS.items():
        log(f"  {label:<48} {cell(summary['warm'][key], 11)} {cell(summary['s3'][key], 9)} "
            f"{cell(summary['nowarmup'][key], 11)}")
    ratio = summary["s3"]["ready"] / summary["warm"]["ready"]
    fetch_mb_s = size_mb / summary["s3"]["fetch"] if summary["s3"]["fetch"] > 0 else float("nan")
    saved = summary["s3"]["ready_split"] - summary["s3"]["ready"]
    log(f"ratio cold start from S3 / from warm cache: {ratio:.2f}x")
    first = {source: summary[source]["first_request"] / summary[source]["warm_request"] for source in SOURCES}
    log(f"ratio first request after ready / warm request (target <= 1.2x): {first['warm']:.2f}x with the warm-up "
        f"(from S3 {first['s3']:.2f}x), {first['nowarmup']:.2f}x without it")
    if math.isfinite(saved):
        overlap = summary["s3"]["ready"] / summary["s3"]["ready_split"]
        log(f"S3 fetch alone: {summary['s3']['fetch']:.2f} s = {fetch_mb_s:.0f} MB/s; ratio preload (fetch overlapped "
            f"with imports) / phases in a row, from S3: {overlap:.2f}x ({saved:.2f} s saved)")
    bound = lower_bound(summary["s3"])
    no_overlap = med([m["ready"] for m in runs[("nooverlap", "preload")]])
    if math.isfinite(bound):
        log(f"lower bound python + max(imports, S3 fetch alone) + load: {bound:.2f} s; ratio ready from S3 / bound: "
            f"{summary['s3']['ready'] / bound:.2f}x (SD_OVERLAP_LOAD=0: {no_overlap / bound:.2f}x, ready in "
            f"{no_overlap:.2f} s)")
    return {"model": model.name, "size_mb": round(size_mb, 1), "rounds": args.rounds, "seconds": summary,
            "lower_bound_s": round(bound, 3), "ready_no_overlap_s": round(no_overlap, 3),
            "s3_vs_warm": round(ratio, 3), "s3_fetch_mb_s": round(fetch_mb_s, 1),
            "first_vs_warm_request": {source: round(value, 3) for source, value in first.items()}}


def lower_bound(row: dict[str, float]) -> float:
    """python start + max(import floor, the fetch on its own) + load, from the split runs (the fetch is this
    project's own, measured alone: the store's ceiling on this machine is at most that fast)."""
    imports = row["import_sd_core"] + row["import_diffusers"] + row["engine"]
    return row["python"] + max(imports, row["fetch"]) + row["load"]


def _columns(marks: list[dict]) -> dict[str, list[float]]:
    return {key: [m[key] for m in marks] for key in marks[0]} if marks else {}


def run_child(args, model: BenchModel, mode: str, env: dict) -> dict:
    command = [sys.executable, "-m", "scripts.bench", "_coldstart-child", "--name", model.name,
               "--arch", ARCH[model.kind], "--size", str(args.size), "--mode", mode]
    t0 = time.time()
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, timeout=1800, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(CHILD_TAG)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"cold-start child failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    marks = json.loads(line[len(CHILD_TAG):])
    order = [k for k in ("main", "import_sd_core", "import_diffusers", "engine", "fetch", "load", "preload",
                         "first_request", "warm_request") if k in marks]
    out = {"python": marks["main"] - t0}
    for previous, key in zip(order, order[1:], strict=False):
        out[key] = marks[key] - marks[previous]
    out["ready"] = marks["load" if mode == "split" else "preload"] - t0
    out["first_image"] = marks["first_request"] - t0
    out["warmup"] = marks["warmup_s"]
    return out
