"""Benchmark `controlnet`: the warm cost of ControlNet units side by side, as ratios to a plain generation.

Rows, each a warm Engine.generate at the same size, steps and seed: a plain generation; one unit whose ControlNet
the previous request used; a switch to another ControlNet (both loaded: SD_CONTROLNET_MAX_LOADED=2); two units
(diffusers' MultiControlNetModel); and a ControlNet's first use, its load from the local weights cache (measured on
a second engine with SD_CONTROLNET_MAX_LOADED=1 alternating the two ControlNets, so that every request loads one).
Tiny model only: the tiny test ControlNets (devtools/tiny_controlnet.py) are the only ones built offline.
"""

from __future__ import annotations

import time
from pathlib import Path

from scripts.bench.common import log, make_settings, med, ms, prepare_model, request_fields

NETS = ("bench-control-a", "bench-control-b")
FOLDERS = ("controlnets/tiny-sd15-control-a/", "controlnets/tiny-sd15-control-b/")
ROWS = {"plain": "plain generation (no ControlNet)",
        "one unit": "one unit, its ControlNet loaded and used last",
        "switch": "switch to another ControlNet (both loaded)",
        "two units": "two units (MultiControlNet, both loaded)",
        "first use": "first use: ControlNet loaded from the cache"}


def with_controlnets(model, where: Path) -> Path:
    """A models folder whose manifest of the benchmark model lists the two tiny ControlNets."""
    import yaml

    where.mkdir(parents=True, exist_ok=True)
    data = {**model.manifest(pinned=False),
            "controlnets": [{"name": name, "uri": uri} for name, uri in zip(NETS, FOLDERS, strict=True)]}
    (where / f"{model.name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return where


def control_map(size: int) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bench(args, work: Path) -> dict:
    import dataclasses

    from sd_core.engine import Engine
    from sd_core.schema import GenerationRequest

    if args.model != "tiny":  # `all --model sd15` runs the others
        log("skipped: the controlnet benchmark runs on --model tiny only (its ControlNets are the tiny ones)")
        return {"skipped": "tiny model only"}
    model = prepare_model(args.model, args.model_cache)
    settings = make_settings(args, model, work, max_batch_images=1, controlnet_max_loaded=2)
    settings = dataclasses.replace(settings, models_dir=with_controlnets(model, work / "models-controlnet"))
    engine = Engine(settings)
    reloading = Engine(dataclasses.replace(settings, controlnet_max_loaded=1))
    engine.preload()
    reloading.preload()
    image = control_map(args.size)

    def run(on, *nets):
        fields = {**request_fields(args, model, 1), "controlnets": [{"model": n, "image": image} for n in nets]}
        started = time.perf_counter()
        on.generate(GenerationRequest(**fields))
        return time.perf_counter() - started

    # One round, in this order (each row needs the state the one before leaves): A primes, A again (one unit),
    # B (a switch), A+B (two units), plain; on the other engine the ControlNet it did not hold last (first use).
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for r in range(args.rounds + 1):  # round 0 warms every path up (and loads the ControlNets once)
        run(engine, NETS[0])
        sample = {"one unit": run(engine, NETS[0]), "switch": run(engine, NETS[1]),
                  "two units": run(engine, *NETS), "plain": run(engine),
                  "first use": run(reloading, NETS[r % 2])}
        if r:
            for name, seconds in sample.items():
                times[name].append(seconds)
    median = {name: med(values) for name, values in times.items()}
    out = {"model": model.name, "size": args.size, "steps": args.steps, "rounds": args.rounds,
           "median_ms": {k: round(v * 1000, 2) for k, v in median.items()},
           "vs_plain": {k: round(v / median["plain"], 4) for k, v in median.items()}}
    log(f"warm requests ({model.name}, {args.size}x{args.size}, {args.steps} steps, {args.scheduler}, "
        f"median of {args.rounds}):")
    log(f"  {'request':<52} {'ms':>8}   ratio to plain")
    for name, label in ROWS.items():
        log(f"  {label:<52} {ms(median[name])}   {out['vs_plain'][name]:.3f}")
    log(f"ratio one unit / plain: {out['vs_plain']['one unit']:.3f}; switch / one unit: "
        f"{median['switch'] / median['one unit']:.3f}; first use / one unit: "
        f"{median['first use'] / median['one unit']:.3f}")
    return out
