"""One-shot GPU check: builds real-size random-weight SD1.5/SDXL on the machine, prints one markdown table.

Run through scripts/gpu_check.sh (docs/development.md, "GPU check"). Progress goes to stderr, the table to stdout
(and to $OUT/gpu_check.md when OUT is set). Every row is guarded: a failure prints "error: <reason>" in its row and
the table still completes; a row that would not fit the time budget (--budget-s) says "skipped: time budget".
``--tiny`` runs the same code on the CPU with the tests' tiny widths, 64x64, 2 steps (tests/tooling/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: nothing is ever downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
STARTED = time.time()
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photo of a red fox in a forest at sunset, detailed, high quality"
NEGATIVE = "blurry, low quality"
SCHEDULER = "DPM++ 2M Karras"
CHILD_TAG = "GPU_CHECK_JSON "
ARCH_LABEL = {"sd15": "SD1.5", "sdxl": "SDXL"}
# (key, row name): the table always lists these rows, in this order.
ROWS = [
    ("sd15-b1", "SD1.5 batch 1"), ("sd15-b4", "SD1.5 batch 4"), ("sdxl-b1", "SDXL batch 1"),
    ("sdxl-b4", "SDXL batch 4"), ("lora", "LoRA switch vs reload (SD1.5)"), ("cold-sd15", "cold start SD1.5"),
    ("cold-sdxl", "cold start SDXL"), ("xformers-sd15", "SD1.5 batch 1, xformers"),
    ("xformers-sdxl", "SDXL batch 1, xformers"), ("compile-sd15", "SD1.5 batch 1, torch.compile UNet"),
]
# Seconds a row needs at least (full size, H200-class GPU); a row is skipped when less than this is left.
NEEDS = {"sd15-b1": 15, "sd15-b4": 25, "sdxl-b1": 40, "sdxl-b4": 90, "lora": 30, "cold-sd15": 30, "cold-sdxl": 60,
         "xformers-sd15": 15, "xformers-sdxl": 40, "compile-sd15": 120}
HEADER = ("check", "setting", "bare diffusers", "sd_core engine", "engine / bare", "peak GPU memory", "notes")


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


def child_row(mode: Mode, key: str, name: str, until: float) -> Row:
    """Run a row in a fresh process (cold start; torch.compile) with a timeout at the time budget."""
    command = [sys.executable, "-m", "scripts.bench.gpu_check", "_child", key, "--work", str(mode.work),
               "--steps", str(mode.steps)] + (["--tiny"] if mode.tiny else [])
    timeout = max(10.0, until - time.time())
    t0 = time.time()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Row(name, notes=f"skipped: over its time budget ({timeout:.0f} s)")
    sys.stderr.write(proc.stderr[-6000:])
    line = next((x for x in proc.stdout.splitlines() if x.startswith(CHILD_TAG)), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"child exited {proc.returncode}: {tail[-1][:200] if tail else 'no output'}")
    data = json.loads(line[len(CHILD_TAG):])
    if key.startswith("cold"):
        ready, first = data["ready"] - t0, data["first_image"] - data["ready"]
        return Row(name, data["setting"], bare="-", engine=f"ready {ready:.1f} s, first image +{first:.1f} s",
                   ratio=f"process start -> image {data['first_image'] - t0:.1f} s", peak=data["peak"],
                   notes=f"local disk only (no SeaweedFS/S3 here), page cache warm; import {data['imports'] - t0:.1f}"
                         f" s, load {data['ready'] - data['imports']:.1f} s")
    return Row(**data["row"])


def run_child(key: str, mode: Mode) -> int:
    """In the fresh process of child_row: print the row's figures as one JSON line."""
    if key.startswith("cold"):
        arch = key.split("-", 1)[1]
        import sd_core.engine

        imports = time.time()
        from sd_core.schema import GenerationRequest

        engine = sd_core.engine.Engine(settings_for(mode, preload=(mode.model_name(arch),)))
        reset_peak()
        engine.preload()
        sync()
        ready = time.time()
        size = mode.size(arch)
        engine.generate(GenerationRequest(prompt=PROMPT, model=mode.model_name(arch), width=size, height=size,
                                          num_inference_steps=mode.steps, scheduler=SCHEDULER, seed=1))
        sync()
        data = {"imports": imports, "ready": ready, "first_image": time.time(), "peak": peak(),
                "setting": f"{size}x{size}, {mode.steps} steps, {mode.dtype}, Engine.preload + one generate"}
    else:  # compile-sd15
        from sd_core.engine import Engine

        if mode.tiny:  # CPU: dynamo's tracing without inductor's code generation (which takes minutes on a CPU)
            import torch

            compile_ = torch.compile
            torch.compile = lambda model, **kw: compile_(model, backend="eager")
        engine = Engine(settings_for(mode, compile_unet=True))
        row = speed_row(engine, mode, "sd15", 1, "compile", time.time() + 60)
        row.setting += ", torch.compile(max-autotune-no-cudagraphs)"
        data = {"row": {**dataclasses.asdict(row), "name": dict(ROWS)["compile-sd15"]}}
    print(CHILD_TAG + json.dumps(data), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def guarded(rows: dict, key: str, until: float, fn, skip: frozenset = frozenset()) -> None:
    name = dict(ROWS)[key]
    if key in skip:
        rows[key] = Row(name, notes="skipped: --skip")
        return
    if time.time() > until:
        rows[key] = Row(name, notes="skipped: time budget")
        progress(f"{name}: skipped (time budget)")
        return
    progress(f"{name} ...")
    try:
        rows[key] = fn(name)
    except Exception as exc:  # one failing row never stops the table
        traceback.print_exc(file=sys.stderr)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        rows[key] = Row(name, notes=f"error: {type(exc).__name__}: {reason}".replace("|", "/"))
    progress(f"{name}: {' | '.join(rows[key].cells()[2:])}")


def table(rows: dict, facts: list[str]) -> str:
    lines = ["### GPU check", "", *facts, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for key, name in ROWS:
        row = rows.get(key) or Row(name, notes="error: not run")
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |")
    return "\n".join(lines) + "\n"


def facts(mode: Mode) -> list[str]:
    import platform

    import diffusers
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    with contextlib.suppress(ImportError):
        import peft

        versions += f", peft {peft.__version__}"
    what = "tiny random-weight models (--tiny dry run)" if mode.tiny else \
        "real-size random-weight models built from the published configs (scripts/bench/configs/)"
    return [f"GPU: **{gpu}**; Python {platform.python_version()}, {versions}; {os.cpu_count()} CPUs.",
            f"Models: {what}; {SCHEDULER}, CFG 7; batch N = one request of N images (`num_outputs`).",
            f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"`scripts/gpu_check.sh{' --tiny' if mode.tiny else ''}`, {time.time() - STARTED:.0f} s in all."]


def run(mode: Mode, budget_s: float, with_compile: bool, skip: frozenset = frozenset()) -> str:
    import functools

    import torch

    from sd_core.engine import Engine

    guard = functools.partial(guarded, skip=skip)
    deadline = STARTED + budget_s
    scale = 0.02 if mode.tiny else 1.0  # tiny rows need seconds

    def until(key: str) -> float:
        """A row starts only while its allowance (NEEDS) is left before the deadline."""
        return deadline - NEEDS[key] * scale

    def stop_at(key: str) -> float:
        """A speed row's timed rounds stop when its allowance is spent (at least one round runs)."""
        return min(deadline, time.time() + NEEDS[key] * scale)

    rows: dict[str, Row] = {}
    progress(f"device {mode.device} ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}), "
             f"work folder {mode.work}, budget {budget_s:.0f} s")
    built: dict[str, Exception | None] = {}
    for arch in ("sd15", "sdxl"):
        try:
            prepare_models(mode, arch)
            built[arch] = None
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            built[arch] = exc
    engine = Engine(settings_for(mode))  # sees both manifests

    def needs_model(arch: str, fn):
        def call(name: str) -> Row:
            if built.get(arch) is not None:
                raise RuntimeError(f"building {arch} failed: {built[arch]}")
            return fn(name)
        return call

    for arch in ("sd15", "sdxl"):
        for batch in (1, 4):
            key = f"{arch}-b{batch}"
            guard(rows, key, until(key), needs_model(arch, lambda name, arch=arch, batch=batch, key=key: speed_row(
                engine, mode, arch, batch, name, stop_at(key))))
    guard(rows, "lora", until("lora"), needs_model("sd15", lambda name: lora_row(engine, mode, name)))
    release(engine)
    for arch in ("sd15", "sdxl"):
        key = f"cold-{arch}"
        guard(rows, key, until(key), needs_model(arch, lambda name, key=key: child_row(
            mode, key, name, deadline - 5)))
    xformers = None
    if mode.device != "cuda":
        xformers = "skipped: xformers needs CUDA"
    else:
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:
            xformers = f"skipped: xformers not importable ({type(exc).__name__})"
    if xformers is None:
        x_engine = Engine(settings_for(mode, attention="xformers"))
        for arch in ("sd15", "sdxl"):
            key = f"xformers-{arch}"
            guard(rows, key, until(key), needs_model(arch, lambda name, arch=arch, key=key: speed_row(
                x_engine, mode, arch, 1, name, stop_at(key))))
        release(x_engine)
    else:
        for key in ("xformers-sd15", "xformers-sdxl"):
            rows[key] = Row(dict(ROWS)[key], notes=xformers)
    if with_compile:
        guard(rows, "compile-sd15", until("compile-sd15"), needs_model("sd15", lambda name: child_row(
            mode, "compile-sd15", name, deadline - 5)))
    else:
        rows["compile-sd15"] = Row(dict(ROWS)["compile-sd15"], notes="skipped: --no-compile")
    return table(rows, facts(mode))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("child", nargs="*", help=argparse.SUPPRESS)  # _child KEY: a row in a fresh process
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny models, 64x64, 2 steps")
    parser.add_argument("--work", type=Path, help="models and cache (default /tmp/gpu-check, or -tiny)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="whole run, seconds (default 450)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30; --tiny 2)")
    parser.add_argument("--rounds", type=int, help="timed rounds per speed row (default 3; --tiny 1)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    parser.add_argument("--skip", type=lambda s: frozenset(x for x in s.split(",") if x), default=frozenset(),
                        help=f"rows to leave out, comma-separated: {','.join(k for k, _ in ROWS)}")
    args = parser.parse_args(argv)
    work = args.work or Path("/tmp/gpu-check" + ("-tiny" if args.tiny else ""))
    mode = Mode(tiny=args.tiny, device="cpu" if args.tiny else "cuda", dtype="float32" if args.tiny else "float16",
                steps=args.steps or (2 if args.tiny else 30), rounds=args.rounds or (1 if args.tiny else 3),
                work=work.resolve())
    mode.work.mkdir(parents=True, exist_ok=True)
    for name in ("diffusers", "transformers"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)
    if args.child:
        return run_child(args.child[1], mode)
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --tiny for the CPU dry run")
    text = run(mode, args.budget_s, args.compile, args.skip)
    sys.stdout.write(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(text)
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
