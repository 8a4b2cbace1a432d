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
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from scripts.bench.gpu_rows import (  # first: sets HF_HUB_OFFLINE before anything imports diffusers
    PROMPT,
    SCHEDULER,
    STARTED,
    Mode,
    Row,
    lora_row,
    peak,
    prepare_models,
    progress,
    release,
    reset_peak,
    settings_for,
    speed_row,
    sync,
)

ROOT = Path(__file__).resolve().parents[2]
CHILD_TAG = "GPU_CHECK_JSON "
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
    parser.add_argument("--budget-s", type=float, default=420.0, help="whole run, seconds (default 420)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30; --tiny 2)")
    parser.add_argument("--rounds", type=int, help="timed rounds per speed row (default 3; --tiny 1)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    parser.add_argument("--skip", type=lambda s: frozenset(x for x in s.split(",") if x), default=frozenset(),
                        help=f"rows to leave out, comma-separated: {','.join(k for k, _ in ROWS)}")
    args = parser.parse_args(argv)
    if args.skip - set(dict(ROWS)):
        parser.error(f"--skip: unknown rows {sorted(args.skip - set(dict(ROWS)))}")
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
