"""Seamless tiling: circular padding in every convolution of the UNet and VAE, for one pipeline call only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# The pipeline components whose convolutions wrap around the image edges (A1111 turns every Conv2d of the model to
# circular padding; the text encoders have none). LoRA layers' own convolutions are included: they are Conv2d too.
# A ControlNet is not: A1111 collects the layers when it loads the checkpoint, and the extension's ControlNets are
# no part of it.
TILED_COMPONENTS = ("unet", "vae")


def _convolutions(pipe) -> list:
    import torch

    layers = []
    for name in TILED_COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None:
            layers.extend(m for m in component.modules() if isinstance(m, torch.nn.Conv2d))
    return layers


@contextlib.contextmanager
def seamless(pipe, enabled: bool) -> Iterator[None]:
    """Within the block, ``pipe``'s UNet and VAE pad circularly (the image tiles left/right and top/bottom) when
    ``enabled``; each layer's own padding mode is restored afterwards, also when the call fails. Used under the GPU
    lock, so no other request ever runs with it."""
    if not enabled:
        yield
        return
    layers = _convolutions(pipe)
    before = [layer.padding_mode for layer in layers]
    try:
        for layer in layers:
            layer.padding_mode = "circular"  # torch pads with F.pad(mode="circular") before each convolution
        yield
    finally:
        for layer, mode in zip(layers, before, strict=True):
            layer.padding_mode = mode
