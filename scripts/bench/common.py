"""Benchmark helpers shared by the scripts/bench modules: output, machine facts, the benchmark models, engines."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before anything imports huggingface_hub / diffusers: a hidden hub call must fail, never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]

# Only the standard library at module level here and in every benchmark module that the entry point imports: the
# cold-start child measures its own imports.
PROMPT = "a photo of a red fox in a forest at sunset, detailed, high quality"
NEGATIVE = "blurry, low quality"
MODEL_NAMES = {"tiny": "tiny-sd15", "sd15": "bench-sd15", "sdxl": "bench-sdxl"}
ARCH = {"tiny": "sd15", "sd15": "sd15", "sdxl": "sdxl"}


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
            from devtools.tiny_models import build_tiny_models

            build_tiny_models(root, archs=("sd15",))
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

    from devtools import tiny_models as tiny

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
# Engines, servers and child processes
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



def run_module(module: str, argv: list[str]) -> dict:
    """`python -m <module> argv` in a fresh process from the repository root, its output passed through."""
    command = [sys.executable, "-m", module, *argv]
    log("$ " + " ".join(command[1:]))
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited with {proc.returncode}")
    return {"command": " ".join(command[1:]), "output": lines[-40:]}
