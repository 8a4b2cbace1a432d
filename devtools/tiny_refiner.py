"""Tiny random-weight SDXL refiners (diffusers folders) next to the tiny SDXL model, for tests and the demo.

The real refiner (stabilityai/stable-diffusion-xl-refiner-1.0) is an img2img pipeline with the OpenCLIP bigG encoder
only (``text_encoder``/``tokenizer`` null), ``requires_aesthetics_score: true`` and ``force_zeros_for_empty_prompt:
false``. Its UNet differs from the base's: cross attention on encoder 2's width only (1280, not 768 + 1280); added
conditioning of the pooled embedding + 5 x 256 (original size, crop, aesthetic score: 2560, not 2816); four levels
(384, 768, 1536, 1536) with DownBlock2D / CrossAttn / CrossAttn / DownBlock2D; 4 transformer layers per block.

Two twins, written under ``DIR/``:
    tiny-sdxl-refiner/diffusers/          its VAE and text_encoder_2 are the tiny SDXL's very files (as the real
                                          refiner ships the base's VAE and bigG weights): the engine shares them
    tiny-sdxl-refiner-own/diffusers/      the same UNet with its own random VAE and text_encoder_2: nothing shared
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

REFINER_ADD_TIME_DIM = 8  # 256, as the base's tiny value


def unet_config(text_2: dict) -> dict:
    """The refiner UNet's config, shrunk as the tiny base's (block topology and conditioning layout are the real)."""
    return dict(
        block_out_channels=(32, 64, 64, 64),  # (384, 768, 1536, 1536)
        attention_head_dim=(2, 4, 4, 4),  # (6, 12, 24, 24)
        transformer_layers_per_block=1,  # 4
        cross_attention_dim=text_2["hidden_size"],  # 1280: encoder 2 only
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=REFINER_ADD_TIME_DIM,
        projection_class_embeddings_input_dim=text_2["projection_dim"] + 5 * REFINER_ADD_TIME_DIM,  # 2560
        sample_size=8,  # 128
        in_channels=4,
        out_channels=4,
    )


def build_refiners(out: Path, seed: int) -> dict[str, Path]:
    """Write both tiny refiners under ``out`` (the tiny SDXL model must be there already: its folder is reused)."""
    from devtools import tiny_models as tiny  # the base's widths, seeding and scheduler

    base = out / "tiny-sdxl" / "diffusers"
    paths = {}
    for name, own in (("tiny-sdxl-refiner", False), ("tiny-sdxl-refiner-own", True)):
        root = out / name
        shutil.rmtree(root, ignore_errors=True)
        torch.manual_seed(seed * 100 + 7)  # the UNet: the same random weights in both twins
        unet = UNet2DConditionModel(**unet_config(tiny.SDXL_TEXT_2))
        if own:
            torch.manual_seed(seed * 100 + 8)
            vocab, _ = tiny.tokenizer_vocab_and_merges()
            text_encoder_2 = CLIPTextModelWithProjection(
                tiny.text_encoder_config(tiny.SDXL_TEXT_2, vocab, "!", "gelu"))
            vae = AutoencoderKL(**tiny.vae_config("sdxl"))
        else:
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")
            vae = AutoencoderKL.from_pretrained(base / "vae")
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
            tokenizer_2=CLIPTokenizer.from_pretrained(base / "tokenizer_2"), unet=unet,
            scheduler=tiny.scheduler("sdxl"), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )
        folder = root / "diffusers"
        pipe.save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(folder / "tokenizer_2")  # the hand-written tokenizer files, as the base keeps them
        shutil.copytree(base / "tokenizer_2", folder / "tokenizer_2")
        if not own:  # byte-identical component files: what the engine compares before sharing modules
            for component in ("vae", "text_encoder_2"):
                shutil.rmtree(folder / component)
                shutil.copytree(base / component, folder / component)
        paths[name] = root
    return paths
