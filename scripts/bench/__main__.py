"""Benchmark suite: one entry point; every figure is a ratio of two things measured side by side in one run.

Run from the repository root (one module per benchmark: scripts/bench/<name>.py):

    python -m scripts.bench imports     # python -X importtime: sd_core, the engine, the Cog and RunPod adapters
    python -m scripts.bench overhead    # warm request: Engine.generate (and the Cog / RunPod servers) vs bare diffusers
    python -m scripts.bench prompt      # warm: plain prompt engine vs bare; weighted/long/edited prompts' cost
    python -m scripts.bench batch       # micro-batching: images/s at 1/2/4/8 concurrent requests vs sequential
    python -m scripts.bench coldstart   # process start -> ready -> first image: warm cache vs S3; first/warm request
    python -m scripts.bench lora        # LoRA switch vs base reload (options it does not know go on to lora.py)
    python -m scripts.bench fetch       # our fetch vs s5cmd / boto3, CPU per GiB, imports alongside (fetch.py)
    python -m scripts.bench controlnet  # warm: one unit, a switch, two units, a first use (load) vs plain (tiny)
    python -m scripts.bench all         # all of the above, one after the other

Every subcommand takes --quick (a 1-2 minute variant) and --smoke (seconds: proves the entry point works; the
figures mean little). Models: --model tiny (the tests' tiny random-weight SD1.5, built offline in seconds), or sd15 /
sdxl: real-size random-weight models (real configs and parameter counts, fp16 safetensors) built once under
--model-cache (default build/bench-models, ~2 GB for sd15, ~7 GB for sdxl). Nothing is downloaded, ever.
--json FILE writes the figures as JSON too. See BENCHMARKS.md for the figures and the machine they came from.
Timings are printed, never asserted: tests/tooling/test_bench_smoke.py only checks that the figures appear.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.common import ROOT, libraries, log, machine

# The benchmarks, in the order `all` runs them; scripts/bench/<name>.py's bench(args, work) runs one.
BENCHES = ("imports", "overhead", "prompt", "batch", "coldstart", "lora", "fetch", "controlnet")

# Per mode: defaults a command line option leaves alone when given. None = keep the option's own default.
PRESETS = {
    "full": {"overhead": dict(rounds=7), "prompt": dict(rounds=7), "batch": dict(requests=48),
             "coldstart": dict(rounds=3), "controlnet": dict(rounds=7)},
    "quick": {"overhead": dict(rounds=3, size=128), "prompt": dict(rounds=3, size=128), "batch": dict(requests=16),
              "coldstart": dict(rounds=1), "controlnet": dict(rounds=3, size=64)},
    "smoke": {"overhead": dict(rounds=1, size=64, steps=2, adapters=False), "prompt": dict(rounds=1, size=64, steps=2),
              "batch": dict(requests=4, levels=[1, 2]), "coldstart": dict(rounds=1),
              "controlnet": dict(rounds=1, size=64, steps=2)},
}
DEFAULTS = {"overhead": dict(size=256, steps=None, adapters=True), "prompt": dict(size=256, steps=8),
            "batch": dict(size=64, steps=4, levels=[1, 2, 4, 8]),
            "coldstart": dict(size=64), "controlnet": dict(size=128, steps=8)}


def levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def steps_arg(text: str) -> int | None:
    return None if text == "auto" else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0],
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
                            ("prompt", "A1111 prompt syntax: plain vs bare, weighted/long/edited vs plain"),
                            ("batch", "micro-batch throughput vs sequential"),
                            ("coldstart", "process start -> ready -> first image: warm cache vs S3, warm-up on/off"),
                            ("controlnet", "warm ControlNet costs vs a plain generation (tiny model)"),
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
        if name in ("prompt", "controlnet"):
            p.add_argument("--size", type=int, help="image side in pixels (default 256; controlnet 128)")
            p.add_argument("--steps", type=int, help="denoising steps (default 8)")
            p.add_argument("--rounds", type=int, help="timed rounds (default 7; quick 3)")
        if name in ("batch", "all"):
            p.add_argument("--batch-size", dest="batch_image_size", type=int, help="batch bench image side (64)")
            p.add_argument("--batch-steps", type=int, help="batch bench steps (default 4)")
            p.add_argument("--levels", type=levels, help="concurrency levels (default 1,2,4,8)")
            p.add_argument("--requests", type=int, help="requests per row (default 48; quick 16)")
            p.add_argument("--max-batch", type=int, default=8, help="SD_MAX_BATCH_IMAGES (default 8)")
        if name in ("coldstart", "all"):
            p.add_argument("--cold-rounds", type=int, help="cold start rounds (default 3; quick 1)")
            p.add_argument("--cold-size", type=int, help="side of the first and the warm request after ready "
                           "(default 64; the warm-up itself always runs at 64)")
        if name == "all":
            p.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=[],
                           help="comma list of benchmarks to leave out (e.g. lora,fetch)")
    for name, help_text in (("lora", "scripts/bench/lora.py: LoRA switch vs base reload"),
                            ("fetch", "scripts/bench/fetch.py: fetch throughput vs boto3 and a ceiling")):
        add(name, help_text + " (options it does not know go on to that module)")
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
        "coldstart": {"rounds": getattr(args, "cold_rounds", None), "size": getattr(args, "cold_size", None)},
        "prompt": ({"size": getattr(args, "size", None), "steps": getattr(args, "steps", None),
                    "rounds": getattr(args, "rounds", None)} if args.command == "prompt" else {}),
        "controlnet": ({"size": getattr(args, "size", None), "steps": getattr(args, "steps", None),
                        "rounds": getattr(args, "rounds", None)} if args.command == "controlnet" else {}),
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
        from scripts.bench.coldstart import coldstart_child

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
        if any(n in ("overhead", "prompt", "batch", "coldstart", "controlnet") for n in names):
            report["libraries"] = libraries()
        log(f"machine: {json.dumps({**report['machine'], **report.get('libraries', {})})}")
        for name in names:
            log(f"\n===== {name} =====")
            started = time.perf_counter()
            try:
                report[name] = importlib.import_module(f"scripts.bench.{name}").bench(options_for(name, args), work)
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
