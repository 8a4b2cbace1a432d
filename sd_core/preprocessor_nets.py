"""The openpose (body only) and lineart_anime ControlNet preprocessors: controlnet_aux's networks built from states."""

from __future__ import annotations

import functools

import numpy as np

MIN_DOWNS = 5  # UnetGenerator's fewest levels (its innermost, three that narrow the width, its outermost)


def import_controlnet_aux(submodule: str):
    """sd_core.preprocessors.import_controlnet_aux (imported here when called: that module imports this one)."""
    from .preprocessors import import_controlnet_aux as imported

    return imported(submodule)


def _open_pose(name: str):
    """controlnet_aux.open_pose.<name>: util first (util and body import each other; util must start)."""
    import_controlnet_aux("open_pose.util")
    return import_controlnet_aux(f"open_pose.{name}")


def build_openpose(state: dict):
    """controlnet_aux's bodypose_model with ``state`` loaded (strict): body_pose_model.pth's keys (conv1_1.weight,
    ... as the annotator ships them; what util.transfer maps) or the model's own (model0.conv1_1.weight, ...)."""
    network = _open_pose("model").bodypose_model()
    if not any(key.startswith("model0.") for key in state):
        expected = {key.split(".", 1)[1] for key in network.state_dict()}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"not an openpose body state dict (missing {missing}, unexpected {extra})")
        state = _open_pose("util").transfer(network, state)
    network.load_state_dict(state, strict=True)
    return network


def build_lineart_anime(state: dict):
    """controlnet_aux's lineart_anime UnetGenerator (instance norm, as its detector builds it) with ``state`` loaded
    (strict): its width (ngf: 64 in netG.pth) read off the first conv, its depth (num_downs: 8) off the number of
    convolutions (one down and one up per level)."""
    import torch

    module = import_controlnet_aux("lineart_anime")
    ngf = state["model.model.0.weight"].shape[0]
    downs = sum(1 for key, value in state.items() if key.endswith(".weight") and value.ndim == 4) // 2
    if downs < MIN_DOWNS:
        raise ValueError(f"a lineart_anime U-Net has at least {MIN_DOWNS} levels, not {downs}")
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    network = module.UnetGenerator(3, 1, downs, ngf, norm_layer=norm, use_dropout=False)
    network.load_state_dict(state, strict=True)
    return network


class OpenposeBodyDetector:
    """The openpose module (body only) as controlnet_aux's OpenposeDetector runs it with include_hand and
    include_face off (called like its detectors): the image at the detect resolution, in BGR order, through Body
    (its 0.5 scale search, peaks and limbs); each body's keypoints drawn by util.draw_bodypose on black; the map
    resized to the image resolution. (OpenposeDetector itself lives in open_pose/__init__, which imports the face
    network and with it torchvision.)"""

    def __init__(self, network):
        body = _open_pose("body").Body
        self.body = body.__new__(body)  # Body.__init__ reads a .pth path; the network is already built
        self.body.model = network

    def __call__(self, pixels: np.ndarray, detect_resolution: int = 512, image_resolution: int = 512,
                 output_type: str = "pil", **_):
        import cv2
        import torch
        from PIL import Image

        util = import_controlnet_aux("util")
        image = util.resize_image(util.HWC3(pixels), detect_resolution)
        height, width = image.shape[:2]
        with torch.no_grad():
            candidate, subset = self.body(image[:, :, ::-1].copy())
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        for found in self.body.format_body_result(candidate, subset):
            keypoints = [None if point is None else point._replace(x=point.x / width, y=point.y / height)
                         for point in found.keypoints]
            canvas = _open_pose("util").draw_bodypose(canvas, keypoints)
        out_h, out_w = util.resize_image(image, image_resolution).shape[:2]
        drawn = cv2.resize(canvas, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        return Image.fromarray(drawn) if output_type == "pil" else drawn


def lineart_anime_detector(network):
    """controlnet_aux's LineartAnimeDetector around ``network`` (its own steps: the image resized up to multiples of
    256, scaled to -1..1, the line map back at the detect size, inverted: dark lines on white become white on black)."""
    return import_controlnet_aux("lineart_anime").LineartAnimeDetector(network)
