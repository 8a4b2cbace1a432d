"""Tiny random-weight IP-Adapters (SD1.5 and SDXL) and the tiny CLIP vision image encoder they share.

Written under ``DIR/ip-adapters/``, laid out like h94/IP-Adapter (``models/image_encoder/`` next to the weights):

    DIR/ip-adapters/image_encoder/                 CLIPVisionModelWithProjection (32 px images, 16-d embeddings)
                                                   + preprocessor_config.json (CLIPImageProcessor, 32 px)
    DIR/ip-adapters/tiny-ip-adapter-sd15.safetensors   `image_proj.*` + `ip_adapter.*` keys, as ip-adapter_sd15
    DIR/ip-adapters/tiny-ip-adapter-sdxl.safetensors   the same for the tiny SDXL UNet's widths

The weights follow the plain IP-Adapter layout diffusers converts (``_convert_ip_adapter_image_proj_to_diffusers``,
``_convert_ip_adapter_attn_to_diffusers``): ``image_proj.proj.weight`` (4 tokens x cross-attention width, embedding
width), ``image_proj.norm.*``, and ``ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`` for each cross-attention processor
of the UNet in ``attn_processors`` order. Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

IMAGE_SIZE = 32  # real: 224
EMBED_DIM = 16  # the encoder's projection width (real: 1024 for ViT-H, 1280 for ViT-bigG)
NUM_TOKENS = 4  # the plain IP-Adapter's image tokens
SEED_OFFSET = 20  # after devtools/tiny_models.py's and tiny_upscaler.py's offsets
WEIGHT_SPREAD = 0.5  # random weights large enough that the adapter visibly changes the tiny images


def write_image_encoder(folder: Path, seed: int) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed * 1000 + SEED_OFFSET)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=EMBED_DIM)
    CLIPVisionModelWithProjection(config).save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


def ip_adapter_state_dict(unet, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random plain-IP-Adapter weights for ``unet`` (a UNet2DConditionModel), in the h94 .safetensors layout."""
    config = unet.config
    cross = config.cross_attention_dim

    def random(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * WEIGHT_SPREAD / shape[-1] ** 0.5).contiguous()

    state = {"image_proj.proj.weight": random(NUM_TOKENS * cross, EMBED_DIM),
             "image_proj.proj.bias": random(NUM_TOKENS * cross),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue  # self-attention: no IP-Adapter weights
        if name.startswith("mid_block"):
            hidden = config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = config.block_out_channels[int(name[len("down_blocks.")])]
        for kind in ("k", "v"):
            state[f"ip_adapter.{key_id}.to_{kind}_ip.weight"] = random(hidden, cross) * 4
        key_id += 2
    return state


def write_tiny_ip_adapter(pipe, arch: str, out: Path, seed: int) -> dict[str, Path]:
    """The tiny IP-Adapter of ``arch`` for ``pipe``'s UNet (and, once, the shared image encoder) under DIR/ip-adapters/;
    {"ip-adapter-A": weights file, "ip-adapter-encoder": encoder folder}."""
    folder = Path(out) / "ip-adapters"
    encoder = folder / "image_encoder"
    write_image_encoder(encoder, seed)  # shared by both architectures: the same bytes each time
    generator = torch.Generator().manual_seed(seed * 1000 + SEED_OFFSET + (1 if arch == "sd15" else 2))
    path = folder / f"tiny-ip-adapter-{arch}.safetensors"
    save_file(ip_adapter_state_dict(pipe.unet, generator), path, metadata={"format": "pt"})
    return {f"ip-adapter-{arch}": path, "ip-adapter-encoder": encoder}
