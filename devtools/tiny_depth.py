"""Random-weight Depth Anything V1 and V2 (depth_anything, depth_anything_v2 preprocessors) for _preprocessors.yaml.

Written as ``DIR/tiny-preprocessors/tiny-depth-anything(-v2).safetensors`` in the layout of the hub's
``LiheYoung/depth-anything-*-hf`` model.safetensors (transformers 4's attention key names, which the loader renames):
the real architecture (DINOv2 backbone, DPT neck and head) at a tiny size; V2 with 12 layers (a published depth, whose
neck reads layers 3, 6, 9, 12, where V1's reads the last four). Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SEED_OFFSET = 16  # after devtools/tiny_preprocessors.py's
FILES = {1: "tiny-depth-anything.safetensors", 2: "tiny-depth-anything-v2.safetensors"}
HIDDEN = 32  # DINOv2 width (one attention head: sd_core.depth_anything.HEAD_DIM); the large model's is 1024
LAYERS = {1: 4, 2: 12}
V2_OUT = [3, 6, 9, 12]
NECK = [8, 16, 32, 32]
FUSION = 8
HEAD = 8
# transformers 5 names -> the hub files' (transformers 4) names
OLD_NAMES = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
             ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."))


def tiny_config(version: int = 1):
    """A twin's DepthAnythingConfig (what sd_core.depth_anything.config_from_state reads back off its tensors)."""
    from transformers import DepthAnythingConfig, Dinov2Config

    layers = LAYERS[version]
    backbone = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=1, mlp_ratio=2,
                            image_size=518, patch_size=14,
                            out_indices=V2_OUT if version == 2 else list(range(layers - 3, layers + 1)),
                            apply_layernorm=version == 1, reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=HIDDEN, patch_size=14,
                               neck_hidden_sizes=NECK, fusion_hidden_size=FUSION, head_hidden_size=HEAD)


def write_tiny_depth(out: Path, seed: int = 0) -> dict[str, Path]:
    """DIR/tiny-preprocessors/tiny-depth-anything(-v2).safetensors; {"preprocessor-depth_anything": path, ...}."""
    from transformers import DepthAnythingForDepthEstimation

    folder = Path(out) / "tiny-preprocessors"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for version, filename in FILES.items():
        torch.manual_seed(seed * 1000 + SEED_OFFSET + version - 1)
        model = DepthAnythingForDepthEstimation(tiny_config(version))
        state = {}
        for key, value in model.state_dict().items():
            for new, old in OLD_NAMES:
                key = key.replace(new, old)
            state[key] = value.detach().contiguous()
        save_file(state, folder / filename, metadata={"format": "pt"})
        paths["preprocessor-depth_anything" + ("_v2" if version == 2 else "")] = folder / filename
    return paths
