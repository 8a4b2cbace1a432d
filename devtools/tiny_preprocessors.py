"""Random-weight ControlNet preprocessor weights (lineart, lineart_coarse, pidinet) for models/_preprocessors.yaml.

Written under ``DIR/tiny-preprocessors/`` as .safetensors in the annotators' own key layout (what converting the real
sk_model.pth, sk_model2.pth and table5_pidinet.pth gives): the lineart Generator with one residual block instead of 3
(the loader counts them), PiDiNet at its real, fixed size (2.8 MB). Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SEED_OFFSET = 11  # after devtools/tiny_upscaler.py's
FILES = {"lineart": "tiny-lineart.safetensors", "lineart_coarse": "tiny-lineart-coarse.safetensors",
         "pidinet": "tiny-pidinet.safetensors"}


def network(weights: str):
    """A fresh (random) network of the kind ``weights`` names, as sd_core.preprocessors builds it."""
    from sd_core.preprocessors import import_controlnet_aux

    if weights == "pidinet":
        return import_controlnet_aux("pidi.model").pidinet()
    return import_controlnet_aux("lineart").Generator(3, 1, 1)


def write_tiny_preprocessors(out: Path, seed: int = 0) -> dict[str, Path]:
    """DIR/tiny-preprocessors/tiny-*.safetensors; {"preprocessor-lineart": path, ...}."""
    folder = Path(out) / "tiny-preprocessors"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for index, (weights, filename) in enumerate(FILES.items()):
        torch.manual_seed(seed * 1000 + SEED_OFFSET + index)
        model = network(weights)
        if weights == "pidinet":  # the default init gives a flat map (every edge ~0.5): spread the weights
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.mul_(2.0)
        state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
        path = folder / filename
        save_file(state, path, metadata={"format": "pt"})
        paths[f"preprocessor-{weights}"] = path
    return paths
