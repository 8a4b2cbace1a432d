"""Random-weight lineart_anime U-Net (the lineart_anime preprocessor) for _preprocessors.yaml.

Written as ``DIR/tiny-preprocessors/tiny-lineart-anime.safetensors`` in netG.pth's layout (controlnet_aux's
UnetGenerator with instance norm): 8 levels as the real one, at width 8 instead of 64 (the loader reads both off the
tensors). Same seed, same bytes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED_OFFSET = 19  # after devtools/tiny_depth.py's
WIDTH = 8  # ngf; netG.pth's is 64
LEVELS = 8  # num_downs, as netG.pth's


def write_tiny_lineart_anime(out: Path, seed: int = 0) -> dict[str, Path]:
    """DIR/tiny-preprocessors/tiny-lineart-anime.safetensors; {"preprocessor-lineart_anime": path}."""
    from sd_core.preprocessors import import_controlnet_aux

    torch.manual_seed(seed * 1000 + SEED_OFFSET)
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    network = import_controlnet_aux("lineart_anime").UnetGenerator(3, 1, LEVELS, WIDTH, norm_layer=norm)
    folder = Path(out) / "tiny-preprocessors"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-lineart-anime.safetensors"
    save_file({key: value.detach().contiguous() for key, value in network.state_dict().items()}, path,
              metadata={"format": "pt"})
    return {"preprocessor-lineart_anime": path}
