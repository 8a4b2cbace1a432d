"""Random-weight openpose body network (body_pose_model.pth's layout) for a test's _preprocessors.yaml, built on demand.

bodypose_model has fixed channel counts (52 M parameters): its twin cannot be small, so it is never committed nor
built by devtools/tiny_models.py; a test fixture writes it (fp16 .safetensors, about 100 MB) into a temporary folder.
Its last layers are set so the detector finds bodies: the keypoint heatmaps scaled up and the limb fields (PAFs) a
constant pointing right and down, so that keypoints to the right or below of another are joined. Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 23
HEATMAP_SPREAD = 0.12  # each keypoint map's standard deviation on the probe
PAF = 0.5  # each limb field's x and y


def spread_heatmaps(network) -> None:
    """The last heatmap conv's outputs (before their ReLU) standardised on a probe image: each keypoint's map centred
    on 0 with a spread of HEATMAP_SPREAD, so it is above the detector's threshold in places, with peaks (the default
    init's maps are nearly flat)."""
    network.eval()
    last = network.model6_2.Mconv7_stage6_L2
    y, x = torch.meshgrid(torch.linspace(-0.5, 0.5, 184), torch.linspace(-0.5, 0.5, 184), indexing="ij")
    probe = torch.stack([x, y, x * y])[None]
    seen = []
    hook = last.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    with torch.no_grad():
        network(probe)
        hook.remove()
        mean, spread = seen[0][0].mean((1, 2)), seen[0][0].std((1, 2))
        gain = HEATMAP_SPREAD / spread
        last.weight.mul_(gain[:, None, None, None])
        last.bias.sub_(mean).mul_(gain)


def openpose_state(seed: int = SEED) -> dict:
    """The twin's state dict in body_pose_model.pth's key layout (conv1_1.weight, ...: no model0. prefix), fp16."""
    from sd_core.preprocessor_nets import import_controlnet_aux

    import_controlnet_aux("open_pose.util")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = import_controlnet_aux("open_pose.model").bodypose_model()
    spread_heatmaps(network)
    with torch.no_grad():
        network.model6_1.Mconv7_stage6_L1.weight.zero_()
        network.model6_1.Mconv7_stage6_L1.bias.fill_(PAF)
    return {key.split(".", 1)[1]: value.detach().half().contiguous() for key, value in network.state_dict().items()}


def write_tiny_openpose(folder: Path, seed: int = SEED) -> Path:
    """FOLDER/tiny-openpose.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-openpose.safetensors"
    save_file(openpose_state(seed), path, metadata={"format": "pt"})
    path.chmod(0o644)
    return path
