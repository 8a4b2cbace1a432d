"""The GPU check's rows measured in-process: bare diffusers vs Engine.generate, LoRA switch vs reload (gpu_check.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: nothing is ever downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
STARTED = time.time()
PROMPT = "a photo of a red fox in a forest at sunset, detailed, high quality"
NEGATIVE = "blurry, low quality"
SCHEDULER = "DPM++ 2M Karras"


@dataclasses.dataclass
class Row:
    name: str
    setting: str = ""
    bare: str = "-"
    engine: str = "-"
    ratio: str = "-"
    peak: str = "-"
    notes: str = ""

    def cells(self) -> tuple[str, ...]:
        return (self.name, self.setting, self.bare, self.engine, self.ratio, self.peak, self.notes)


def progress(message: str) -> None:
    print(f"[gpu-check {time.time() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Mode:
    tiny: bool
    device: str
    dtype: str
    steps: int
    rounds: int
    work: Path

    def size(self, arch: str) -> int:
        return 64 if self.tiny else {"sd15": 512, "sdxl": 1024}[arch]

    def model_name(self, arch: str) -> str:
        return f"gpucheck-{arch}"


# ---------------------------------------------------------------------------------------------------------------
# Models and engines
# ---------------------------------------------------------------------------------------------------------------
def prepare_models(mode: Mode, arch: str) -> Path:
    """Build the model (once per work folder) and write its manifest (+ two LoRAs for SD1.5); return the folder."""
    from scripts.bench.gpu_models import build

    folder = mode.work / "bucket" / arch
    if not (folder / "model_index.json").exists():
        t = time.perf_counter()
        build(arch, folder, tiny=mode.tiny, device=mode.device, dtype="float32" if mode.tiny else "float16")
        size_gb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9
        progress(f"built {arch} ({size_gb:.2f} GB) in {time.perf_counter() - t:.1f} s")
    manifest = {"name": mode.model_name(arch), "architecture": arch, "format": "diffusers", "uri": str(folder) + "/",
                "description": "gpu check: random weights"}
    if arch == "sd15":
        from scripts.bench.lora import write_random_lora

        manifest["loras"] = [
            {"name": f"gpucheck-{n}", "uri": str(write_random_lora(folder, mode.work / "loras" / f"{n}.safetensors",
                                                                    16, seed))}
            for n, seed in (("A", 1), ("B", 2))]
    models = mode.work / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / f"{mode.model_name(arch)}.yaml").write_text(json.dumps(manifest))  # JSON is YAML
    return folder


def settings_for(mode: Mode, *, attention: str = "sdpa", compile_unet: bool = False, preload: tuple = ()):
    from sd_core.settings import Settings

    return dataclasses.replace(
        Settings.from_env(), models_dir=mode.work / "models", weights_uri=str(mode.work / "bucket"),
        cache_dir=mode.work / "cache", device=mode.device, dtype=mode.dtype, attention=attention,
        torch_compile=compile_unet, preload_models=preload, default_model=None,
        pipeline_memory_mb=1,  # one model on the GPU at a time: each row's peak memory is its own
    )


def release(engine) -> None:
    """Free an engine's loaded models (its batcher thread lives on, holding no model)."""
    import torch

    with contextlib.suppress(AttributeError):
        engine.pool._models.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    sync()
    t = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - t, value


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak() -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else "n/a (CPU)"


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------
def speed_row(engine, mode: Mode, arch: str, batch: int, name: str, until: float) -> Row:
    """images/s of a bare diffusers call on the engine's own pipeline vs Engine.generate, same settings."""
    import numpy as np
    import torch
    from PIL import Image

    from sd_core.schema import GenerationRequest

    size, steps = mode.size(arch), mode.steps
    row = Row(name, f"{size}x{size}, {steps} steps, {SCHEDULER}, {mode.dtype}, {engine.settings.attention}")
    model = engine.pool.get(mode.model_name(arch))
    pipe, scheduler = model.pipeline("txt2img"), model.scheduler(SCHEDULER)
    reset_peak()

    def bare(seed: int):
        pipe.scheduler = scheduler
        with torch.inference_mode():
            return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=batch, num_inference_steps=steps,
                        guidance_scale=7.0, width=size, height=size, output_type="pil",
                        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]).images

    def ours(seed: int):
        return engine.generate(GenerationRequest(
            prompt=PROMPT, negative_prompt=NEGATIVE, model=mode.model_name(arch), width=size, height=size,
            num_inference_steps=steps, guidance_scale=7.0, scheduler=SCHEDULER, seed=seed, num_outputs=batch))

    t_warm, _ = timed(lambda: (bare(0), ours(0)))  # first calls: allocations, kernel selection, (compile)
    times: dict[str, list[float]] = {"bare": [], "engine": []}
    diff = None
    for r in range(mode.rounds):
        if r and time.time() + t_warm > until:
            break
        for what in (("bare", "engine") if r % 2 == 0 else ("engine", "bare")):
            t, out = timed(lambda what=what, r=r: bare(100 + r) if what == "bare" else ours(100 + r))
            times[what].append(t)
            if what == "bare" and batch == 1:
                bare_pixels = np.asarray(out[0].convert("RGB"), dtype=np.int16)
            elif batch == 1:
                engine_pixels = np.asarray(Image.open(io.BytesIO(out.images[0].data)).convert("RGB"), dtype=np.int16)
        if batch == 1:
            diff = max(diff or 0, int(np.abs(bare_pixels - engine_pixels).max()))
    bare_s, engine_s = statistics.median(times["bare"]), statistics.median(times["engine"])
    row.bare = f"{batch / bare_s:.2f} img/s ({bare_s:.2f} s)"
    row.engine = f"{batch / engine_s:.2f} img/s ({engine_s:.2f} s)"
    row.ratio = f"{engine_s / bare_s:.3f} ({(engine_s / bare_s - 1) * 100:+.1f} %)"
    row.peak = peak()
    row.notes = (f"median of {len(times['bare'])}; first calls {t_warm:.1f} s"
                 + (f"; same pixels as bare: max diff {diff}" if diff is not None else ""))
    return row


def lora_row(engine, mode: Mode, name: str) -> Row:
    """sd_core's LoRA switch (cold: first load; warm: between loaded sets) vs reloading the base model."""
    from sd_core.manifests import fetch_model
    from sd_core.pipelines import load_pipeline
    from sd_core.schema import GenerationRequest, LoraSpec

    label = mode.model_name("sd15")
    manifest = engine.catalog.get(label)
    local = fetch_model(manifest, engine.settings)
    model = engine.pool.get(label)
    reset_peak()

    def reload() -> None:
        loaded = load_pipeline(local, engine.settings, engine.placement)
        del loaded
        gc.collect()

    reload()  # page cache warm: the best case for reloading
    reload_s = statistics.median(timed(reload)[0] for _ in range(2))

    def resolved(*specs):
        request = GenerationRequest(loras=[LoraSpec(source=f"gpucheck-{n}", scale=s) for n, s in specs])
        return engine.loras.prepare(request, manifest)[1]

    cold = [timed(lambda n=n: engine.loras.activate(model, resolved((n, 1.0))))[0] for n in ("A", "B")]
    sets = [resolved(("A", 1.0)), resolved(("B", 1.0)), resolved(("A", 0.7), ("B", 0.5)), resolved()]
    warm = [timed(lambda s=s: engine.loras.activate(model, s))[0] for s in sets * 3]
    warm_s = statistics.median(warm)
    return Row(name, f"rank-16 LoRAs (UNet + text encoder), {mode.dtype}", bare=f"reload base {reload_s:.2f} s",
               engine=f"switch {warm_s * 1000:.1f} ms warm, {statistics.median(cold):.2f} s first load",
               ratio=f"reload / warm switch {reload_s / warm_s:.0f}x", peak=peak(),
               notes="reload from local disk, page cache warm")
