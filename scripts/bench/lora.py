"""Benchmark: switching LoRAs on a loaded model (sd_core's hot swap) vs reloading the base model, side by side.

For each model it measures, in one run and through sd_core's own code paths:

- reload         ``pipelines.load_pipeline`` of the base model from the local cache, page cache warm (the best case
                 for a worker that reloads the base model whenever the LoRA set changes)
- reload + LoRA  that, plus ``load_lora_weights`` of one LoRA (what such a worker pays per LoRA change)
- cold switch    ``LoraManager.activate`` of a LoRA never loaded before (reads the file, injects the adapter)
- warm switch    ``LoraManager.activate`` between sets already in memory ({A}, {B}, {A 0.7 + B 0.5}, {} ...)

and prints the ratios reload / warm switch and (reload + LoRA) / cold switch (the target is at least 10x).

Models: ``tiny`` (the tiny random SD1.5 of devtools.tiny_models) and ``sd15-full`` (a full-size SD1.5 — 860M-parameter
UNet, CLIP-L text encoder, full VAE — with random weights, bf16, ~2 GB; built once into --work-dir, ~1-2 min on CPU).
LoRAs: two random rank-R LoRAs (non-zero B) on the attention projections of UNet and text encoder, peft format.

    python -m scripts.bench lora                      # both models, CPU
    python -m scripts.bench lora --models tiny        # just the tiny one (seconds)
    python -m scripts.bench lora --device cuda        # on a GPU worker

The entry point runs this module in a fresh process (``python -m scripts.bench.lora``, the options above).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.common import run_module  # first: sets HF_HUB_OFFLINE before anything imports diffusers

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FULL_SD15 = {  # the real SD1.5 widths (devtools.tiny_models keeps the topology and cuts these down)
    "unet": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=64),
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "vae": dict(block_out_channels=(128, 256, 512, 512), sample_size=512),
}


def bench(args, work: Path) -> dict:
    """The `lora` benchmark of the entry point: this module in a fresh process; it builds its own models (tiny, and
    a full-size SD1.5 in bf16), kept under --model-cache."""
    argv = ["--work-dir", str(args.model_cache / "lora"), "--device", args.device]
    if args.smoke:
        argv += ["--models", "tiny", "--repeats", "1"]
    elif args.quick:
        argv += ["--repeats", "2"]
    return run_module("scripts.bench.lora", [*argv, *args.extra])


# --- building the models and LoRAs --------------------------------------------------------------------------------
def build_tiny(bucket: Path) -> Path:
    if not (bucket / "tiny-sd15" / "diffusers" / "model_index.json").exists():
        from devtools.tiny_models import build_tiny_models

        build_tiny_models(bucket, archs=("sd15",))
    return bucket / "tiny-sd15" / "diffusers"


def build_full_sd15(bucket: Path, seed: int = 0) -> Path:
    """A full-size SD1.5 diffusers folder with random weights (bf16), reusing the tiny model's tokenizer/scheduler."""
    folder = bucket / "sd15-full" / "diffusers"
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from devtools import tiny_models as tiny

    tiny_folder = build_tiny(bucket)
    staging = folder.with_name("staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(tiny_folder, staging, ignore=shutil.ignore_patterns("*.safetensors"))
    started = time.perf_counter()
    torch.manual_seed(seed)
    vocab, _ = tiny.tokenizer_vocab_and_merges()
    parts = {
        "unet": UNet2DConditionModel(**dict(tiny.unet_config("sd15"), **FULL_SD15["unet"])),
        "text_encoder": CLIPTextModel(tiny.text_encoder_config(FULL_SD15["text"], vocab, tiny.EOS, "quick_gelu")),
        "vae": AutoencoderKL(**dict(tiny.vae_config("sd15"), **FULL_SD15["vae"])),
    }
    for name, module in parts.items():
        shutil.rmtree(staging / name, ignore_errors=True)
        module.to(torch.bfloat16).save_pretrained(staging / name, safe_serialization=True)
    staging.rename(folder)
    print(f"built full-size SD1.5 (random weights) in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return folder


def write_random_lora(folder: Path, path: Path, rank: int, seed: int) -> Path:
    """A peft-format LoRA (as diffusers' save_lora_weights writes it) for the model in ``folder``, random A and B."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    if path.exists():
        return path
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        weights = load_file(next((folder / component).glob("*.safetensors")))
        found = {}
        for key, tensor in weights.items():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and tensor.ndim == 2 and module.endswith(targets):
                found[module] = tensor.shape
        layer = {}
        for module, (out_features, in_features) in sorted(found.items()):
            name = module if component == "unet" or module.startswith("text_model.") else "text_model." + module
            layer[f"{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            layer[f"{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) / rank**0.5 * 0.05
        layers[component] = layer
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        weight_name=path.name,
    )
    return path


# --- measuring ----------------------------------------------------------------------------------------------------
def timed(fn) -> float:
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_model(label: str, folder: Path, work: Path, args) -> dict:
    import torch

    from sd_core.engine import Engine
    from sd_core.manifests import fetch_model
    from sd_core.pipelines import load_pipeline
    from sd_core.schema import GenerationRequest, LoraSpec
    from sd_core.settings import Settings

    loras = {name: write_random_lora(folder, work / "loras" / f"{label}-{name}.safetensors", args.rank, seed)
             for name, seed in (("A", 1), ("B", 2), ("C", 3), ("D", 4))}
    models = work / f"models-{label}"
    models.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": label, "architecture": "sd15", "format": "diffusers", "uri": str(folder) + "/",
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 1, "scheduler": "Euler"},
        "loras": [{"name": f"{label}-{name}", "uri": str(path)} for name, path in loras.items()],
    }
    (models / f"{label}.yaml").write_text(json.dumps(manifest))  # JSON is YAML
    settings = Settings(models_dir=models, weights_uri=str(work), cache_dir=work / "cache", device=args.device,
                        dtype=args.dtype, default_model=label, max_batch_images=1)
    engine = Engine(settings)
    catalog_manifest = engine.catalog.get(label)
    local = fetch_model(catalog_manifest, settings)

    # Reload the base model: once to warm the page cache, then timed (each copy freed before the next).
    def reload_once(with_lora: bool) -> None:
        model = load_pipeline(local, settings, engine.placement)
        if with_lora:
            model.pipeline("txt2img").load_lora_weights(str(loras["A"]), adapter_name="a", use_safetensors=True)
        del model
        gc.collect()

    reload_once(False)
    reload_s = [timed(lambda: reload_once(False)) for _ in range(args.repeats)]
    reload_lora_s = [timed(lambda: reload_once(True)) for _ in range(args.repeats)]

    model = engine.pool.get(label)

    def resolved(*specs):
        request = GenerationRequest(loras=[LoraSpec(source=f"{label}-{n}", scale=s) for n, s in specs])
        return engine.loras.prepare(request, catalog_manifest)[1]

    sets = {"A": resolved(("A", 1.0)), "B": resolved(("B", 1.0)), "A+B": resolved(("A", 0.7), ("B", 0.5)),
            "none": resolved()}
    cold_s = []
    for name in ("A", "B", "C", "D"):  # first activation of each: file read + adapter injection
        one = resolved((name, 1.0))
        cold_s.append(timed(lambda one=one: engine.loras.activate(model, one)))
    warm_s, order = [], ["A", "B", "A+B", "none"]
    for i in range(args.repeats * len(order)):
        target = sets[order[i % len(order)]]
        warm_s.append(timed(lambda target=target: engine.loras.activate(model, target)))

    # Sanity: the switches really change what the model computes, and "none" is the base model again.
    def image(loras_set):
        engine.loras.activate(model, loras_set)
        pipe = model.pipeline("txt2img")
        out = pipe("a fox", num_inference_steps=1, width=64, height=64, output_type="pt",
                   generator=torch.Generator("cpu").manual_seed(0))
        return out.images.float().cpu()

    base, with_a, base_again = image(sets["none"]), image(sets["A"]), image(sets["none"])
    return {
        "model": label,
        "params_m": sum(p.numel() for n, p in model.pipeline("txt2img").unet.named_parameters()
                        if ".lora_" not in n) / 1e6,
        "lora_mb": loras["A"].stat().st_size / 2**20,
        "reload_s": statistics.median(reload_s),
        "reload_lora_s": statistics.median(reload_lora_s),
        "cold_switch_s": statistics.median(cold_s),
        "warm_switch_s": statistics.median(warm_s),
        "lora_changes_output": float((with_a - base).abs().mean()),
        "base_restored_exactly": bool(torch.equal(base, base_again)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--models", nargs="+", choices=("tiny", "sd15-full"), default=["tiny", "sd15-full"])
    parser.add_argument("--work-dir", type=Path, default=None, help="keep built models here (default: a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16 (default: bfloat16)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        work = (args.work_dir or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        builders = {"tiny": build_tiny, "sd15-full": build_full_sd15}
        rows = [bench_model(name, builders[name](work / "bucket"), work, args) for name in args.models]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nLoRA switch vs base-model reload — {device}, {args.dtype}, rank {args.rank}, median of {args.repeats}")
    header = (f"{'model':10} {'UNet M':>7} {'LoRA MB':>8} {'reload':>9} {'reload+LoRA':>12} {'cold switch':>12} "
              f"{'warm switch':>12} {'reload/warm':>12} {'(reload+LoRA)/cold':>19}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:10} {r['params_m']:7.0f} {r['lora_mb']:8.1f} {r['reload_s']:8.3f}s "
              f"{r['reload_lora_s']:11.3f}s {r['cold_switch_s'] * 1e3:10.1f}ms {r['warm_switch_s'] * 1e3:10.1f}ms "
              f"{r['reload_s'] / r['warm_switch_s']:11.0f}x {r['reload_lora_s'] / r['cold_switch_s']:18.1f}x")
    for r in rows:
        print(f"{r['model']}: LoRA changes the output by {r['lora_changes_output']:.2e} (mean abs, 0-1 image); "
              f"no LoRA afterwards gives the base output exactly: {r['base_restored_exactly']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
