"""Tiny alternate VAEs for the tiny models (a manifest's `vaes:`): same config as the model's VAE, other weights.

For each architecture A, under ``DIR/vaes/``:

    tiny-A-vae/                 diffusers AutoencoderKL folder (config.json + safetensors weights)
    tiny-A-vae.safetensors      the same weights as one file in the original (A1111) VAE key layout, no prefix

Called by devtools/tiny_models.py's ``build_arch``; the same seed gives byte-identical files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from devtools.tiny_models import SEED_OFFSETS, vae_config, vae_to_original

SEED_OFFSET = SEED_OFFSETS["vae"] + 50  # not the model's own VAE seed: other weights, other images


def build_tiny_vae(arch: str, seed: int) -> AutoencoderKL:
    """An AutoencoderKL with the tiny model's VAE config (scaling factor, upcast) and its own random weights."""
    torch.manual_seed(seed * 100 + SEED_OFFSET)
    return AutoencoderKL(**vae_config(arch))


def write_tiny_vaes(arch: str, out: Path, seed: int) -> dict[str, Path]:
    """Write the alternate VAE of ``arch`` as a folder and as a single file under ``out``; return their paths."""
    vae = build_tiny_vae(arch, seed)
    folder, single = out / f"tiny-{arch}-vae", out / f"tiny-{arch}-vae.safetensors"
    shutil.rmtree(folder, ignore_errors=True)
    vae.save_pretrained(folder, safe_serialization=True)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in vae_to_original(vae.state_dict(), vae.config, prefix="").items()}
    save_file(state, single, metadata={"format": "pt"})
    return {f"vae-{arch}": folder, f"vae-{arch}-single": single}
