"""Random-weight SD1.5 / SDXL diffusers folders from the published component configs (scripts/bench/configs/).

The JSON files there are the real models' configs (runwayml SD1.5, stabilityai SDXL base 1.0, OpenAI CLIP ViT-L/14,
OpenCLIP ViT-bigG/14 text towers): the real layer sizes and parameter counts, never downloaded. The tokenizers are the
tests' tiny ones (devtools/tiny_models.py; token ids stay inside the real 49408-row embedding tables). With
``tiny=True`` the same builder cuts the widths down to devtools/tiny_models.py's (seconds on a CPU).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
TEXT_KEYS_DROPPED = ("architectures", "model_type")
# Published parameter counts (millions) of the real components, for the check in tests/tooling/test_gpu_check.py.
REAL_PARAMS_M = {
    ("sd15", "unet"): 859.5, ("sd15", "vae"): 83.7, ("sd15", "text_encoder"): 123.1,
    ("sdxl", "unet"): 2567.5, ("sdxl", "vae"): 83.7, ("sdxl", "text_encoder"): 123.1,
    ("sdxl", "text_encoder_2"): 694.7,
}


def components(arch: str) -> tuple[str, ...]:
    return ("unet", "vae", "text_encoder", "text_encoder_2") if arch == "sdxl" else ("unet", "vae", "text_encoder")


def load_config(arch: str, component: str, *, tiny: bool = False) -> dict:
    """The published config of one component; with ``tiny``, devtools.tiny_models' widths laid over it."""
    config = json.loads((CONFIGS / arch / f"{component}.json").read_text())
    if not tiny:
        return config
    from devtools import tiny_models as t

    vocab, _ = t.tokenizer_vocab_and_merges()
    small = {
        "unet": t.unet_config(arch), "vae": t.vae_config(arch),
        "text_encoder": dict(t.SD15_TEXT if arch == "sd15" else t.SDXL_TEXT_1, vocab_size=len(vocab)),
        "text_encoder_2": dict(t.SDXL_TEXT_2, vocab_size=len(vocab)),
    }[component]
    return {**config, **small}


def build_module(arch: str, component: str, *, tiny: bool = False):
    """One component with fresh random weights (on the current default device and dtype)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from devtools import tiny_models as t

    config = load_config(arch, component, tiny=tiny)
    if component == "unet":
        return UNet2DConditionModel.from_config(config)
    if component == "vae":
        return AutoencoderKL.from_config(config)
    vocab, _ = t.tokenizer_vocab_and_merges()
    pad = t.EOS if component == "text_encoder" else "!"  # as the tokenizers written by build()
    fields = {k: v for k, v in config.items() if k not in TEXT_KEYS_DROPPED}
    # Pooling looks for the tokenizer's own end-of-text id (the legacy argmax rule applies only to id 2).
    fields.update(bos_token_id=vocab[t.BOS], eos_token_id=vocab[t.EOS], pad_token_id=vocab[pad])
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    return cls(CLIPTextConfig(**fields))


def build(arch: str, out: Path, *, tiny: bool = False, device: str = "cpu", dtype: str = "float16",
          seed: int = 0) -> Path:
    """Write a diffusers folder (fp16/fp32 safetensors) of ``arch`` with random weights to ``out``; return it.

    The modules are initialised on ``device`` (on a GPU, seconds even for SDXL) and saved from there.
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from devtools import tiny_models as t

    torch_dtype = getattr(torch, dtype)
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]), _defaults(device, torch_dtype):
        torch.manual_seed(seed)
        tokenizers = Path(scratch)
        t.write_tokenizer(tokenizers / "tokenizer", pad_token=t.EOS)
        parts = {name: build_module(arch, name, tiny=tiny) for name in components(arch)}
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizers / "tokenizer", local_files_only=True)
        if arch == "sdxl":
            t.write_tokenizer(tokenizers / "tokenizer_2", pad_token="!")  # real SDXL pads its second prompt with "!"
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(tokenizers / "tokenizer_2", local_files_only=True)
            pipe = StableDiffusionXLPipeline(**parts, scheduler=t.scheduler(arch))
        else:
            pipe = StableDiffusionPipeline(**parts, scheduler=t.scheduler(arch), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):  # keep the hand-written files
            shutil.rmtree(out / name)
            shutil.copytree(tokenizers / name, out / name)
        del pipe, parts
    return out


@contextlib.contextmanager
def _defaults(device: str, dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def param_counts_m(arch: str, *, tiny: bool = False) -> dict[str, float]:
    """Parameters (millions) of each component, built on the meta device (no memory, no init cost)."""
    import torch

    with torch.device("meta"):
        return {name: sum(p.numel() for p in build_module(arch, name, tiny=tiny).parameters()) / 1e6
                for name in components(arch)}
