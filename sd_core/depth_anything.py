"""The depth_anything(_v2) ControlNet preprocessors: transformers' DepthAnythingForDepthEstimation, extension steps."""

from __future__ import annotations

import numpy as np

from .errors import InvalidRequest

NET_SIDE = 518  # the network's input: short side at least this, both sides multiples of PATCH (the extension's Resize)
PATCH = 14
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
MAX_ASPECT = 8  # the network's input has its short side at 518: a longer side past 8 x 518 is refused (memory)
HEAD_DIM = 64  # DINOv2's attention head size in every published size (small 6 heads, base 12, large 16, giant 24)
# Depth Anything V2 reads these backbone layers (by its depth: small/base, large, giant), V1 the last four; V2 skips
# the backbone's final layernorm (both as transformers' conversion scripts set them).
V2_LAYERS = {12: [3, 6, 9, 12], 24: [5, 12, 18, 24], 40: [10, 20, 30, 40]}
# The hub's *-hf model.safetensors name DINOv2's attention layers as transformers 4 did; transformers 5 renames them
# when it loads a checkpoint (its conversion_mapping.py) and so does build_depth_anything.
RENAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
           ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))


def config_from_state(state: dict, version: int = 1):
    """The DepthAnythingConfig of a Depth Anything state dict (``version`` 1 or 2: the files look alike): the sizes
    read off its tensors, the backbone layers the neck reads and the final layernorm as the version has them."""
    from transformers import DepthAnythingConfig, Dinov2Config

    hidden = state["backbone.embeddings.cls_token"].shape[-1]
    layers = len({key.split(".")[3] for key in state if key.startswith("backbone.encoder.layer.")})
    positions = state["backbone.embeddings.position_embeddings"].shape[1] - 1
    mlp = state["backbone.encoder.layer.0.mlp.fc1.weight"].shape[0]
    if version == 2 and layers not in V2_LAYERS:
        raise ValueError(f"a Depth Anything V2 backbone has {', '.join(map(str, V2_LAYERS))} layers, not {layers}")
    backbone = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // HEAD_DIM), mlp_ratio=mlp // hidden,
                            image_size=round(positions ** 0.5) * PATCH, patch_size=PATCH,
                            out_indices=V2_LAYERS[layers] if version == 2 else list(range(layers - 3, layers + 1)),
                            apply_layernorm=version == 1,
                            reshape_hidden_states=False)
    neck = [state[f"neck.reassemble_stage.layers.{i}.projection.weight"].shape[0] for i in range(4)]
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=hidden, patch_size=PATCH,
                               neck_hidden_sizes=neck, fusion_hidden_size=state["neck.convs.0.weight"].shape[0],
                               head_hidden_size=state["head.conv2.weight"].shape[0])


def build_depth_anything(state: dict, version: int = 1):
    """DepthAnythingForDepthEstimation with ``state`` loaded (strict): a -hf model.safetensors (either key layout)."""
    from transformers import DepthAnythingForDepthEstimation

    for old, new in RENAMES:
        state = {key.replace(old, new): value for key, value in state.items()}
    network = DepthAnythingForDepthEstimation(config_from_state(state, version))
    network.load_state_dict(state, strict=True)
    return network


def net_size(width: int, height: int) -> tuple[int, int]:
    """The network's input size for an image: scaled (aspect kept) so both sides are at least NET_SIDE, each side
    rounded to a multiple of PATCH (up, when rounding would go below NET_SIDE): the extension's Resize."""
    scale = max(NET_SIDE / width, NET_SIDE / height)

    def side(x: float) -> int:
        y = int(np.round(x / PATCH) * PATCH)
        return int(np.ceil(x / PATCH) * PATCH) if y < NET_SIDE else y

    return side(scale * width), side(scale * height)


class DepthAnythingDetector:
    """The depth map of an RGB image as the extension's depth_anything module makes it (called like controlnet_aux's
    detectors, on the image already resized and padded: sd_core/preprocessor_geometry.py): fed to the network in BGR
    order (the extension converts its RGB image with COLOR_BGR2RGB), depth scaled back to the input's size, min-max
    normalised to 0-255."""

    def __init__(self, network):
        self.network = network

    def __call__(self, pixels: np.ndarray, output_type: str = "pil", **_):
        import cv2
        import torch
        from PIL import Image

        h, w = pixels.shape[:2]
        if max(h, w) > MAX_ASPECT * min(h, w):
            raise InvalidRequest(f"Depth Anything works on at least {NET_SIDE} pixels a side: a control image more "
                                 f"than {MAX_ASPECT} times longer than wide is refused (got {w}x{h} at the "
                                 "preprocessor's resolution)")
        image = pixels[..., ::-1] / 255.0
        image = (cv2.resize(image, net_size(w, h), interpolation=cv2.INTER_CUBIC) - MEAN) / STD
        parameter = next(self.network.parameters())
        batch = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32))[None]
        with torch.no_grad():
            depth = self.network(pixel_values=batch.to(parameter.device, parameter.dtype)).predicted_depth.float()
            depth = torch.nn.functional.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
            span = depth.max() - depth.min()
            depth = (depth - depth.min()) / span * 255.0 if span > 0 else torch.zeros_like(depth)
        gray = depth.cpu().numpy().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB") if output_type == "pil" else np.repeat(gray[..., None], 3, 2)
