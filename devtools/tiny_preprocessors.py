"""Random-weight ControlNet preprocessor weights (lineart, lineart_coarse, pidinet, mlsd) for _preprocessors.yaml.

Written under ``DIR/tiny-preprocessors/`` as .safetensors in the annotators' own key layout (what converting the real
sk_model.pth, sk_model2.pth, table5_pidinet.pth and mlsd_large_512_fp32.pth gives): the lineart Generator with one
residual block instead of 3 (the loader counts them), PiDiNet (2.8 MB) and M-LSD (6 MB) at their real, fixed sizes
(Depth Anything: devtools/tiny_depth.py). Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SEED_OFFSET = 11  # after devtools/tiny_upscaler.py's
FILES = {"lineart": "tiny-lineart.safetensors", "lineart_coarse": "tiny-lineart-coarse.safetensors",
         "pidinet": "tiny-pidinet.safetensors", "mlsd": "tiny-mlsd.safetensors"}
MLSD_OUTPUT_GAIN = 1000.0  # M-LSD's default init gives outputs ~0.001 (no line at all): its last conv is scaled up


def network(weights: str):
    """A fresh (random) network of the kind ``weights`` names, as sd_core.preprocessors builds it."""
    from sd_core.preprocessors import import_controlnet_aux

    if weights == "pidinet":
        return import_controlnet_aux("pidi.model").pidinet()
    if weights == "mlsd":
        return import_controlnet_aux("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large()
    return import_controlnet_aux("lineart").Generator(3, 1, 1)


def spread_mlsd(model) -> None:
    """Random M-LSD weights that find lines: the last conv scaled up, its 9 used outputs (line centres, then the
    displacements to the ends) centred on a probe image, so centres score 0.03-0.98 and lines are a few pixels long."""
    model.eval()
    y, x = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    probe = torch.stack([x, y, (x * y > 0).float() * 2 - 1, torch.ones_like(x)])[None]
    last = model.block23.conv3
    with torch.no_grad():
        last.weight.mul_(MLSD_OUTPUT_GAIN)
        last.bias.mul_(MLSD_OUTPUT_GAIN)
        last.bias[7:].sub_(model(probe)[0].mean((1, 2)))


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
        elif weights == "mlsd":
            spread_mlsd(model)
        state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
        path = folder / filename
        save_file(state, path, metadata={"format": "pt"})
        paths[f"preprocessor-{weights}"] = path
    return paths
