#!/usr/bin/env python
"""Benchmark suite: one entry point; every figure is a ratio of two things measured side by side in one run.

    python scripts/bench.py imports     # python -X importtime: sd_core, the engine, the Cog and RunPod adapters
    python scripts/bench.py overhead    # warm request: Engine.generate (and the Cog / RunPod servers) vs bare diffusers
    python scripts/bench.py batch       # micro-batching: images/s at 1/2/4/8 concurrent requests vs sequential
    python scripts/bench.py coldstart   # process start -> ready (python, import, fetch, load): warm cache vs S3
    python scripts/bench.py lora        # scripts/bench_lora.py: LoRA switch vs base reload
    python scripts/bench.py fetch       # scripts/bench_fetch.py: our fetch vs boto3 vs a loopback ceiling
    python scripts/bench.py all         # all of the above, one after the other

Every subcommand takes --quick (a 1-2 minute variant) and --smoke (seconds: proves the entry point works; the
figures mean little). Models: --model tiny (the tests' tiny random-weight SD1.5, built offline in seconds), or sd15 /
sdxl: real-size random-weight models (real configs and parameter counts, fp16 safetensors) built once under
--model-cache (default build/bench-models, ~2 GB for sd15, ~7 GB for sdxl). Nothing is downloaded, ever.
--json FILE writes the figures as JSON too. See BENCHMARKS.md for the figures and the machine they came from.
Timings are printed, never asserted: tests/test_bench_smoke.py only checks that the figures appear.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Before anything imports huggingface_hub / diffusers: a hidden hub call must fail, never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Only the standard library above this line: the cold-start child measures its own imports.
PROMPT = "a photo of a red fox in a forest at sunset, detailed, high quality"
NEGATIVE = "blurry, low quality"
MODEL_NAMES = {"tiny": "tiny-sd15", "sd15": "bench-sd15", "sdxl": "bench-sdxl"}
ARCH = {"tiny": "sd15", "sd15": "sd15", "sdxl": "sdxl"}
CHILD_TAG = "COLDSTART_JSON "


# ==============================================================================================================
# Small helpers
# ==============================================================================================================
def log(message: str = "") -> None:
    print(message, flush=True)


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.2f} %"


def machine() -> dict:
    """Where the figures come from (printed at the top of every run and stored in the JSON)."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average": round(os.getloadavg()[0], 2)}
    with contextlib.suppress(OSError, ValueError):
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
        info["memory_gb"] = round(kb / 2**20, 1)
    return info


def libraries() -> dict:
    import diffusers
    import torch

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def seconds_of(fn):
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


# ==============================================================================================================
# Models: the tiny test model, or real-size random-weight SD1.5 / SDXL (real configs, never downloaded)
# ==============================================================================================================
@dataclasses.dataclass
class BenchModel:
    kind: str  # tiny | sd15 | sdxl
    name: str  # manifest name
    bucket: Path  # a folder laid out like the weights bucket (SD_WEIGHTS_URI)
    folder: str  # the model's diffusers folder, relative to bucket
    pins: dict[str, str]  # {relative path: sha256} of the diffusers folder

    def manifest(self, *, pinned: bool) -> dict:
        data = {"name": self.name, "description": f"benchmark model ({self.kind}, random weights)",
                "architecture": ARCH[self.kind], "format": "diffusers", "uri": self.folder.rstrip("/") + "/"}
        if pinned:
            data["files"] = dict(self.pins)
        return data

    def models_dir(self, where: Path, *, pinned: bool) -> Path:
        """A folder holding this model's manifest only (relative URI: joined onto SD_WEIGHTS_URI)."""
        import yaml

        where.mkdir(parents=True, exist_ok=True)
        (where / f"{self.name}.yaml").write_text(yaml.safe_dump(self.manifest(pinned=pinned), sort_keys=False))
        return where


def load_tiny_builder():
    import importlib.util

    name = "make_tiny_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "make_tiny_model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def prepare_model(kind: str, cache: Path) -> BenchModel:
    """Build (once; reused from `cache`) the benchmark model and return where it lies."""
    from sd_core.storage import file_sha256

    root = cache / kind
    done = root / "complete.json"
    folder = {"tiny": "tiny-sd15/diffusers", "sd15": "bench-sd15/diffusers", "sdxl": "bench-sdxl/diffusers"}[kind]
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t = time.perf_counter()
        log(f"building the {kind} benchmark model under {root} (once) ...")
        if kind == "tiny":
            load_tiny_builder().build_tiny_models(root, archs=("sd15",))
        else:
            build_full_size(kind, root / folder)
        pins = {p.relative_to(root / folder).as_posix(): file_sha256(p)
                for p in sorted((root / folder).rglob("*")) if p.is_file()}
        done.write_text(json.dumps({"pins": pins}, indent=1))
        log(f"  built in {time.perf_counter() - t:.1f} s")
    pins = json.loads(done.read_text())["pins"]
    return BenchModel(kind=kind, name=MODEL_NAMES[kind], bucket=root, folder=folder, pins=pins)


def build_full_size(kind: str, out: Path) -> None:
    """A diffusers folder with the real SD1.5 / SDXL component configs and fresh random weights, saved in fp16.

    Only the tokenizer is tiny (the test tokenizer: a few hundred tokens, so the embedding table is small); every
    layer the denoising loop runs has its real size. The images are noise: this model is for timings only.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tiny = load_tiny_builder()
    vocab, _ = tiny.tokenizer_vocab_and_merges()
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=4)
    @contextlib.contextmanager
    def default_dtype(dtype):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)

    # Built (and saved) in fp16: half the memory, so SDXL fits in ~6 GB.
    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]), default_dtype(torch.float16):
        torch.manual_seed(0)
        tokenizers = Path(scratch)
        tiny.write_tokenizer(tokenizers / "tokenizer", pad_token=tiny.EOS)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizers / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel(tiny.text_encoder_config(clip_l, vocab, tiny.EOS, "quick_gelu"))
        if kind == "sd15":
            unet = UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            )
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL(**vae, sample_size=512, scaling_factor=0.18215), text_encoder=text_encoder,
                tokenizer=tokenizer, unet=unet, scheduler=tiny.scheduler("sd15"), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
        else:
            tiny.write_tokenizer(tokenizers / "tokenizer_2", pad_token="!")
            tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizers / "tokenizer_2", local_files_only=True)
            big_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                         projection_dim=1280)
            text_encoder_2 = CLIPTextModelWithProjection(tiny.text_encoder_config(big_g, vocab, "!", "gelu"))
            unet = UNet2DConditionModel(
                sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            pipe = StableDiffusionXLPipeline(
                vae=AutoencoderKL(**vae, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=tiny.scheduler("sdxl"),
            )
        pipe.to(torch.float16)
        pipe.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in unet.parameters())
    log(f"  {kind}: UNet {params / 1e6:.0f} M parameters (real: {'860' if kind == 'sd15' else '2567'} M)")


# ==============================================================================================================
# Engines
# ==============================================================================================================
def make_settings(args, model: BenchModel, work: Path, **changes):
    from sd_core.settings import Settings

    base = Settings.from_env()
    return dataclasses.replace(
        base, models_dir=model.models_dir(work / "models-local", pinned=False), weights_uri=str(model.bucket),
        cache_dir=work / "cache", device=args.device, dtype=args.dtype, attention=args.attention,
        torch_compile=args.compile, default_model=model.name, preload_models=(model.name,), **changes,
    )


def server_env(args, model: BenchModel, work: Path) -> dict[str, str]:
    """Environment for an adapter server: the same model, folder and precision as the in-process engine."""
    return {
        "SD_MODELS_DIR": str(work / "models-local"), "SD_WEIGHTS_URI": str(model.bucket),
        "SD_CACHE_DIR": str(work / "cache"), "SD_DEVICE": args.device, "SD_DTYPE": args.dtype,
        "SD_ATTENTION": args.attention, "SD_TORCH_COMPILE": "1" if args.compile else "0",
        "SD_DEFAULT_MODEL": model.name, "SD_PRELOAD_MODELS": model.name, "HF_HUB_OFFLINE": "1",
    }


def request_fields(args, model: BenchModel, seed: int, prompt: str = PROMPT) -> dict:
    return {"prompt": prompt, "negative_prompt": NEGATIVE, "model": model.name, "width": args.size,
            "height": args.size, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
            "scheduler": args.scheduler, "seed": seed, "output_format": "png"}


def decode(data: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# ==============================================================================================================
# 1. Warm request overhead
# ==============================================================================================================
def bench_overhead(args, work: Path) -> dict:
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
    if not (ROOT / ("predict.py" if adapter == "cog" else "handler.py")).exists():
        log(f"  {adapter}: adapter not present, skipped")
        return None
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


# ==============================================================================================================
# 2. Micro-batch throughput
# ==============================================================================================================
def bench_batch(args, work: Path) -> dict:
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


# ==============================================================================================================
# 3. Cold start
# ==============================================================================================================
def coldstart_child(args) -> int:
    """Runs in a fresh process: time each cold-start phase, print them as one JSON line.

    --mode split: the phases one after another (import diffusers, fetch, load), to see what each costs;
    --mode preload: what the adapters do (Engine(settings).preload(): downloads overlap the diffusers import).
    """
    marks = {"main": time.time()}
    import sd_core.engine  # torch, pydantic, our modules

    marks["import_sd_core"] = time.time()
    from sd_core.schema import GenerationRequest
    from sd_core.settings import Settings

    settings = Settings.from_env()
    if args.mode == "split":
        import diffusers

        getattr(diffusers, "StableDiffusionXLPipeline" if args.arch == "sdxl" else "StableDiffusionPipeline")
        marks["import_diffusers"] = time.time()
    engine = sd_core.engine.Engine(settings)
    marks["engine"] = time.time()
    if args.mode == "split":
        from sd_core.models import fetch_model

        fetch_model(engine.catalog.get(args.name), settings)
        marks["fetch"] = time.time()
    engine.preload()  # split: the fetch above filled the cache, so this is the load (plus a cache lookup)
    marks["load" if args.mode == "split" else "preload"] = time.time()
    engine.generate(GenerationRequest(prompt=PROMPT, model=args.name, width=args.size, height=args.size,
                                      num_inference_steps=2, seed=1))
    marks["first_request"] = time.time()
    print(CHILD_TAG + json.dumps(marks), flush=True)
    return 0


COLD_LABELS = {
    "python": "python start", "import_sd_core": "import sd_core.engine (torch)",
    "import_diffusers": "import diffusers pipeline", "engine": "Engine() (manifests, device)",
    "fetch": "fetch (cache hit / S3 download)", "load": "load pipeline", "ready_split": "= ready, phases in a row",
    "preload": "Engine.preload (fetch || import, load)", "ready": "= ready, as the adapters start",
    "first_request": "first request (2 steps), after ready",
}


def bench_coldstart(args, work: Path) -> dict:
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
                    marks = run_child(args, model, mode, {**env, "SD_CACHE_DIR": str(cache)})
                    runs.setdefault((source, mode), []).append(marks)
                    detail = (f"fetch {marks['fetch']:.2f} s, load {marks['load']:.2f} s" if mode == "split"
                              else f"preload {marks['preload']:.2f} s")
                    log(f"  round {r + 1}/{args.rounds} {source:>4} {mode:>7}: ready in {marks['ready']:.2f} s "
                        f"({detail})")
                shutil.rmtree(cache, ignore_errors=True)
    summary: dict[str, dict[str, float]] = {}
    nan = float("nan")
    for source in ("warm", "s3"):
        split = {k: med(v) for k, v in _columns(runs.get((source, "split"), [])).items()}
        real = {k: med(v) for k, v in _columns(runs[(source, "preload")]).items()}
        row = {k: split.get(k, nan) for k in ("python", "import_sd_core", "import_diffusers", "engine", "fetch",
                                               "load")}
        row.update(ready_split=split.get("ready", nan), preload=real["preload"], ready=real["ready"],
                   first_request=real["first_request"])
        summary[source] = {k: round(v, 3) for k, v in row.items()}
    log("")
    log(f"cold start, process start -> ready ({model.name}, {size_mb:.0f} MB, {args.device}/{args.dtype}; "
        f"median of {args.rounds}; seconds):")
    log(f"  {'phase':<40} {'warm cache':>11} {'from S3':>9}")
    def cell(value: float, width: int) -> str:
        return f"{value:{width}.2f}" if math.isfinite(value) else " " * (width - 1) + "-"

    for key, label in COLD_LABELS.items():
        log(f"  {label:<40} {cell(summary['warm'][key], 11)} {cell(summary['s3'][key], 9)}")
    ratio = summary["s3"]["ready"] / summary["warm"]["ready"]
    fetch_mb_s = size_mb / summary["s3"]["fetch"] if summary["s3"]["fetch"] > 0 else float("nan")
    saved = summary["s3"]["ready_split"] - summary["s3"]["ready"]
    log(f"ratio cold start from S3 / from warm cache: {ratio:.2f}x")
    if math.isfinite(saved):
        overlap = summary["s3"]["ready"] / summary["s3"]["ready_split"]
        log(f"S3 fetch alone: {summary['s3']['fetch']:.2f} s = {fetch_mb_s:.0f} MB/s; ratio preload (fetch overlapped "
            f"with imports) / phases in a row, from S3: {overlap:.2f}x ({saved:.2f} s saved)")
    return {"model": model.name, "size_mb": round(size_mb, 1), "rounds": args.rounds, "seconds": summary,
            "s3_vs_warm": round(ratio, 3), "s3_fetch_mb_s": round(fetch_mb_s, 1)}


def _columns(marks: list[dict]) -> dict[str, list[float]]:
    return {key: [m[key] for m in marks] for key in marks[0]} if marks else {}


def run_child(args, model: BenchModel, mode: str, env: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "_coldstart-child", "--name", model.name,
               "--arch", ARCH[model.kind], "--size", str(args.size), "--mode", mode]
    t0 = time.time()
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, timeout=1800, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(CHILD_TAG)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"cold-start child failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    marks = json.loads(line[len(CHILD_TAG):])
    order = [k for k in ("main", "import_sd_core", "import_diffusers", "engine", "fetch", "load", "preload",
                         "first_request") if k in marks]
    out = {"python": marks["main"] - t0}
    for previous, key in zip(order, order[1:], strict=False):
        out[key] = marks[key] - marks[previous]
    out["ready"] = marks["load" if mode == "split" else "preload"] - t0
    return out


# ==============================================================================================================
# Import costs (python -X importtime)
# ==============================================================================================================
IMPORTS = {
    "sd_core": "import sd_core",
    "sd_core.engine": "import sd_core.engine",
    "sd_core.engine + diffusers pipeline": "import sd_core.engine, diffusers; diffusers.StableDiffusionPipeline",
    "predict.py (Cog adapter)": "import predict",
    "handler.py (RunPod adapter)": "import handler",
}


def importtime(code: str) -> tuple[float, dict[str, float]]:
    """One fresh `python -X importtime -c code`: (total import seconds, {top-level package: seconds of its own})."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{code!r} failed:\n{proc.stderr[-2000:]}")
    by_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # not a timing line, or the header
        package = parts[2].strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(parts[0]) / 1e6  # self time: no double counting
    return sum(by_package.values()), by_package


def bench_imports(args, work: Path) -> dict:
    out = {}
    rounds = 1 if args.smoke else 3
    log(f"python -X importtime, fresh process each, median of {rounds}; the packages that cost most (own time):")
    for label, code in IMPORTS.items():
        if label.startswith(("predict", "handler")) and not (ROOT / label.split()[0]).exists():
            continue
        if args.smoke and "engine" in label:
            continue  # seconds each: the smoke run only proves the command works
        runs = sorted(importtime(code) for _ in range(rounds))
        total, packages = runs[len(runs) // 2]
        heavy = sorted(packages.items(), key=lambda item: -item[1])[:6]
        out[label] = {"seconds": round(total, 3), "top": {name: round(sec, 3) for name, sec in heavy}}
        log(f"  {label:<36} {total * 1000:6.0f} ms: " + ", ".join(f"{n} {sec * 1000:.0f}" for n, sec in heavy))
    return out


# ==============================================================================================================
# 4. LoRA and fetch: the other helpers' scripts, run from here
# ==============================================================================================================
def run_script(script: str, argv: list[str]) -> dict:
    path = ROOT / "scripts" / script
    if not path.exists():
        log(f"{script} not present: skipped")
        return {"skipped": f"{script} not present"}
    command = [sys.executable, str(path), *argv]
    log("$ " + " ".join(command[1:]))
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    if proc.returncode != 0:
        raise RuntimeError(f"{script} exited with {proc.returncode}")
    return {"command": " ".join(command[1:]), "output": lines[-40:]}


def bench_lora(args, work: Path) -> dict:
    # bench_lora.py builds its own models (tiny, and a full-size SD1.5 in bf16): kept under --model-cache.
    argv = ["--work-dir", str(args.model_cache / "lora"), "--device", args.device]
    if args.smoke:
        argv += ["--models", "tiny", "--repeats", "1"]
    elif args.quick:
        argv += ["--repeats", "2"]
    return run_script("bench_lora.py", [*argv, *args.extra])


def bench_fetch(args, work: Path) -> dict:
    argv = list(args.extra)
    if args.smoke:
        argv = ["--size", "8MiB", "--rounds", "1", *argv]
    elif args.quick:
        argv = ["--size", "256MiB", "--rounds", "1", *argv]
    return run_script("bench_fetch.py", argv)  # its own temp folder (nginx needs one it can read)


# ==============================================================================================================
# Command line
# ==============================================================================================================
BENCHES = {"imports": bench_imports, "overhead": bench_overhead, "batch": bench_batch, "coldstart": bench_coldstart,
           "lora": bench_lora, "fetch": bench_fetch}

# Per mode: defaults a command line option leaves alone when given. None = keep the option's own default.
PRESETS = {
    "full": {"overhead": dict(rounds=7), "batch": dict(requests=48), "coldstart": dict(rounds=3)},
    "quick": {"overhead": dict(rounds=3, size=128), "batch": dict(requests=16), "coldstart": dict(rounds=1)},
    "smoke": {"overhead": dict(rounds=1, size=64, steps=2, adapters=False), "batch": dict(requests=4, levels=[1, 2]),
              "coldstart": dict(rounds=1)},
}
DEFAULTS = {"overhead": dict(size=256, steps=None, adapters=True),
            "batch": dict(size=64, steps=4, levels=[1, 2, 4, 8]),
            "coldstart": dict(size=64)}


def levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def steps_arg(text: str) -> int | None:
    return None if text == "auto" else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    mode = common.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a 1-2 minute variant (fewer rounds, smaller images)")
    mode.add_argument("--smoke", action="store_true", help="seconds: proves the entry point works (tests use it)")
    common.add_argument("--model", choices=("tiny", "sd15", "sdxl"), default="tiny",
                        help="tiny test model (default) or a real-size random-weight sd15 / sdxl")
    common.add_argument("--model-cache", type=Path, default=ROOT / "build" / "bench-models",
                        help="where built benchmark models are kept (default build/bench-models)")
    common.add_argument("--work-dir", type=Path, help="scratch folder (default: a temp folder, removed at the end)")
    common.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    common.add_argument("--device", default="cpu", help="SD_DEVICE for the engines (default cpu)")
    common.add_argument("--dtype", default="float32", help="SD_DTYPE (default float32; float16 on a GPU)")
    common.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"), help="SD_ATTENTION")
    common.add_argument("--compile", action="store_true", help="SD_TORCH_COMPILE=1 (torch.compile the UNet)")
    common.add_argument("--scheduler", default="DPM++ 2M Karras", help="A1111 sampler name")
    common.add_argument("--guidance", type=float, default=7.0)
    common.add_argument("--threads", type=int, help="torch CPU threads here and OMP_NUM_THREADS for the servers and "
                        "cold-start processes (default: torch's own choice); 1 steadies timings on a busy machine")

    def add(name, help_text):
        return sub.add_parser(name, parents=[common], help=help_text)

    for name, help_text in (("imports", "python -X importtime of sd_core, the engine and the adapters"),
                            ("overhead", "warm request overhead vs a bare diffusers call"),
                            ("batch", "micro-batch throughput vs sequential"),
                            ("coldstart", "process start -> ready: warm cache vs S3"),
                            ("all", "every benchmark, one after the other")):
        p = add(name, help_text)
        if name in ("overhead", "all"):
            p.add_argument("--size", type=int, help="image side in pixels (overhead default 256)")
            p.add_argument("--steps", type=steps_arg, help="denoising steps or 'auto' (default: auto = enough "
                           "for a bare call of >= --min-seconds)")
            p.add_argument("--min-seconds", type=float, default=1.0, help="auto steps target (default 1.0)")
            p.add_argument("--rounds", type=int, help="timed rounds (default 7; quick 3)")
            p.add_argument("--no-adapters", dest="adapters", action="store_false", default=None,
                           help="skip the Cog and RunPod servers")
        if name in ("batch", "all"):
            p.add_argument("--batch-size", dest="batch_image_size", type=int, help="batch bench image side (64)")
            p.add_argument("--batch-steps", type=int, help="batch bench steps (default 4)")
            p.add_argument("--levels", type=levels, help="concurrency levels (default 1,2,4,8)")
            p.add_argument("--requests", type=int, help="requests per row (default 48; quick 16)")
            p.add_argument("--max-batch", type=int, default=8, help="SD_MAX_BATCH_IMAGES (default 8)")
        if name in ("coldstart", "all"):
            p.add_argument("--cold-rounds", type=int, help="cold start rounds (default 3; quick 1)")
        if name == "all":
            p.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=[],
                           help="comma list of benchmarks to leave out (e.g. lora,fetch)")
    for name, help_text in (("lora", "scripts/bench_lora.py: LoRA switch vs base reload"),
                            ("fetch", "scripts/bench_fetch.py: fetch throughput vs boto3 and a ceiling")):
        add(name, help_text + " (options it does not know go on to the script)")
    child = sub.add_parser("_coldstart-child")  # internal: one cold start, in its own process
    child.add_argument("--name", required=True)
    child.add_argument("--arch", default="sd15")
    child.add_argument("--size", type=int, default=64)
    child.add_argument("--mode", choices=("split", "preload"), default="preload")
    return parser


def options_for(bench: str, args) -> argparse.Namespace:
    """The options one benchmark runs with: command line > mode preset > default."""
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    values = {**DEFAULTS.get(bench, {}), **PRESETS[mode].get(bench, {})}
    given = {
        "overhead": {"size": getattr(args, "size", None), "steps": getattr(args, "steps", None),
                     "rounds": getattr(args, "rounds", None), "adapters": getattr(args, "adapters", None)},
        "batch": {"size": getattr(args, "batch_image_size", None), "steps": getattr(args, "batch_steps", None),
                  "levels": getattr(args, "levels", None), "requests": getattr(args, "requests", None)},
        "coldstart": {"rounds": getattr(args, "cold_rounds", None)},
    }.get(bench, {})
    values.update({k: v for k, v in given.items() if v is not None})
    opts = argparse.Namespace(**vars(args))
    for key, value in values.items():
        setattr(opts, key, value)
    opts.max_batch = getattr(args, "max_batch", 8)
    opts.min_seconds = getattr(args, "min_seconds", 1.0)
    opts.extra = getattr(args, "extra", [])
    return opts


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("lora", "fetch"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if args.command == "_coldstart-child":
        return coldstart_child(args)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the servers and cold-start processes
        import torch

        torch.set_num_threads(args.threads)
    names = list(BENCHES) if args.command == "all" else [args.command]
    names = [n for n in names if n not in getattr(args, "skip", [])]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(), "command": " ".join(sys.argv[1:] if argv is None else argv)}
    failed = []
    try:
        if any(n in ("overhead", "batch", "coldstart") for n in names):
            report["libraries"] = libraries()
        log(f"machine: {json.dumps({**report['machine'], **report.get('libraries', {})})}")
        for name in names:
            log(f"\n===== {name} =====")
            started = time.perf_counter()
            try:
                report[name] = BENCHES[name](options_for(name, args), work)
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
                failed.append(name)
                report[name] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            log(f"({name}: {time.perf_counter() - started:.0f} s)")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        log(f"\nfigures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
