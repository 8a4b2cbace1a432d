"""Tiny textual-inversion embeddings in A1111's .safetensors layout, for the tiny models (tests and the demo).

    DIR/embeddings/tiny-sd15-neg.safetensors  {"emb_params": (2, 32)}: 2 vectors of the tiny SD1.5 text encoder
    DIR/embeddings/tiny-sdxl-neg.safetensors  {"clip_l": (2, 32), "clip_g": (2, 64)}: A1111's SDXL layout
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

VECTORS = 2
SEED_OFFSET = 7  # next to devtools.tiny_models.SEED_OFFSETS (its components use 1-6)


def _vectors(encoder, generator: torch.Generator) -> torch.Tensor:
    """Random vectors on the scale of the encoder's own token embeddings (a few times larger: a visible change)."""
    weight = encoder.get_input_embeddings().weight.detach().float()
    return torch.randn(VECTORS, weight.shape[1], generator=generator) * weight.std() * 4


def write_embeddings(pipe, arch: str, directory: Path, seed: int) -> dict[str, Path]:
    """Write the tiny embedding of ``arch`` (sd15: one tensor `emb_params`; sdxl: `clip_l` + `clip_g`)."""
    generator = torch.Generator().manual_seed(seed * 100 + SEED_OFFSET)
    if arch == "sdxl":
        state = {"clip_l": _vectors(pipe.text_encoder, generator), "clip_g": _vectors(pipe.text_encoder_2, generator)}
    else:
        state = {"emb_params": _vectors(pipe.text_encoder, generator)}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"tiny-{arch}-neg.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return {f"embedding-{arch}": path}
