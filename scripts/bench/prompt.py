"""Benchmark `prompt`: warm requests side by side: a plain prompt through Engine.generate vs bare diffusers, and the
A1111 prompt syntax's cost (a weighted prompt, a two-chunk prompt, prompt editing) over that plain prompt."""

from __future__ import annotations

import time
from pathlib import Path

from scripts.bench.common import NEGATIVE, PROMPT, log, make_settings, med, ms, pct, prepare_model, request_fields

VARIANTS = {
    "plain": PROMPT,  # no syntax: the pipeline encodes the text itself (the hot path)
    "weighted": "a photo of a (red fox:1.3) in a [forest] at sunset, detailed, high quality",
    "two chunks": f"{PROMPT} BREAK {PROMPT}",
    "editing": "a photo of a red [fox:wolf:0.5] in a forest at sunset, detailed, high quality",
}


def bench(args, work: Path) -> dict:
    import torch

    from sd_core.engine import Engine
    from sd_core.prompt_encoding import encode_prompt
    from sd_core.schema import GenerationRequest

    model = prepare_model(args.model, args.model_cache)
    engine = Engine(make_settings(args, model, work, max_batch_images=1))
    engine.preload()
    loaded = engine.pool.get(model.name)
    pipe = loaded.pipeline("txt2img")
    scheduler = loaded.scheduler(args.scheduler)
    steps = args.steps or 8

    def bare():
        pipe.scheduler = scheduler
        with torch.inference_mode():
            return pipe(prompt=[PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=steps,
                        guidance_scale=args.guidance, width=args.size, height=args.size,
                        generator=[torch.Generator("cpu").manual_seed(1)], output_type="pil").images

    def ours(prompt: str):
        fields = {**request_fields(args, model, 1, prompt), "num_inference_steps": steps}
        return engine.generate(GenerationRequest(**fields))

    calls = {"bare": bare, **{name: (lambda p=p: ours(p)) for name, p in VARIANTS.items()}}
    for call in calls.values():  # warm-up
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: spread drift evenly
            t = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t)
    encode: dict[str, float] = {}
    with torch.inference_mode():
        for name in ("weighted", "two chunks"):
            samples = []
            for _ in range(max(3, args.rounds)):
                t = time.perf_counter()
                encode_prompt(pipe, VARIANTS[name])
                samples.append(time.perf_counter() - t)
            encode[name] = med(samples)

    median = {name: med(values) for name, values in times.items()}
    out = {"model": model.name, "size": args.size, "steps": steps, "rounds": args.rounds,
           "median_ms": {k: round(v * 1000, 2) for k, v in median.items()},
           "encode_ms": {k: round(v * 1000, 3) for k, v in encode.items()},
           "plain_vs_bare": round(median["plain"] / median["bare"], 4)}
    for name in ("weighted", "two chunks", "editing"):
        out[f"{name}_vs_plain"] = round(median[name] / median["plain"], 4)
    log(f"warm requests ({model.name}, {args.size}x{args.size}, {steps} steps, median of {args.rounds}):")
    log(f"  {'bare diffusers call (plain prompt)':<44} {ms(median['bare'])}")
    for name in VARIANTS:
        log(f"  {'Engine.generate, ' + name + ' prompt':<44} {ms(median[name])}")
    for name, seconds in encode.items():
        log(f"  {'    prompt_encoding.encode_prompt, ' + name:<44} {ms(seconds)}")
    log(f"ratio plain prompt engine / bare diffusers: {out['plain_vs_bare']:.4f} ({pct(out['plain_vs_bare'])})")
    for name in ("weighted", "two chunks", "editing"):
        ratio = out[f"{name}_vs_plain"]
        log(f"ratio {name} prompt / plain prompt (engine): {ratio:.4f} ({pct(ratio)})")
    return out
