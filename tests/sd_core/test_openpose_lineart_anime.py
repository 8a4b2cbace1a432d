"""The openpose (body only) and lineart_anime ControlNet preprocessors: each map equals controlnet_aux's own network
and steps on the same weights (openpose: Body loading the annotator's .pth, its drawing on black), each unit through
the Engine equals its precomputed map; the loaders read the networks' sizes and layouts off the state dicts."""

import dataclasses
import functools

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from devtools.tiny_openpose import write_tiny_openpose
from sd_core.control_images import control_image, fit
from sd_core.errors import ManifestError
from sd_core.preprocessors import Preprocessors, build_network, import_controlnet_aux
from sd_core.schema import GenerationRequest
from sd_core.settings import REPO_ROOT
from tests.sd_core.test_controlnet import FAST, as_array, b64, pixels
from tests.sd_core.test_preprocessors import extension_pad, shapes

UNIT = {"model": "tiny-control-a", "scale": 1.0}


@pytest.fixture(scope="module")
def openpose_weights(tmp_path_factory):
    """The random-weight body network (about 100 MB, built on demand: never in the bucket nor the repository)."""
    return write_tiny_openpose(tmp_path_factory.mktemp("tiny-openpose"))


@pytest.fixture(scope="module")
def pose_engine(engine_settings, openpose_weights, tmp_path_factory):
    """An Engine whose models dir is the repository's with an openpose entry added to _preprocessors.yaml."""
    from sd_core.engine import Engine

    models = tmp_path_factory.mktemp("models-openpose")
    for path in (REPO_ROOT / "models").iterdir():
        if path.name != "_preprocessors.yaml":
            (models / path.name).symlink_to(path)
    manifest = yaml.safe_load((REPO_ROOT / "models" / "_preprocessors.yaml").read_text())
    manifest["preprocessors"].append({"name": "openpose", "uri": str(openpose_weights)})
    (models / "_preprocessors.yaml").write_text(yaml.safe_dump(manifest))
    return Engine(dataclasses.replace(engine_settings, models_dir=models))


@pytest.fixture(scope="module")
def pose_map(pose_engine):
    """The openpose map of shapes() at 64x64 (detected with its short side at 128), by the worker's preprocessors."""
    return control_image(shapes((128, 128)), width=64, height=64, preprocessor="openpose", resize_mode="just_resize",
                         processor_res=128, preprocessors=pose_engine.controlnets.preprocessors)


def library_openpose(weights_pth, rgb: np.ndarray, resolution: int) -> np.ndarray:
    """controlnet_aux's OpenposeDetector, body only, written out from its steps (its class is in open_pose/__init__,
    which imports torchvision): Body loading the .pth itself, the image in BGR, each body drawn on black."""
    util, aux = import_controlnet_aux("open_pose.util"), import_controlnet_aux("util")
    body_module = import_controlnet_aux("open_pose.body")
    body = body_module.Body(str(weights_pth))
    image = aux.resize_image(aux.HWC3(rgb), resolution)
    height, width = image.shape[:2]
    candidate, subset = body(image[:, :, ::-1].copy())
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for found in body.format_body_result(candidate, subset):
        canvas = util.draw_bodypose(canvas, [None if p is None else body_module.Keypoint(p.x / width, p.y / height)
                                             for p in found.keypoints])
    return cv2.resize(aux.HWC3(canvas), (width, height), interpolation=cv2.INTER_LINEAR)


def test_openpose_equals_controlnet_aux_body_and_drawing(pose_engine, pose_map, openpose_weights, tmp_path):
    assert "openpose" in pose_engine.controlnets.preprocessors.names()
    pth = tmp_path / "body_pose_model.pth"  # the annotator's format: what Body.__init__ reads
    torch.save(load_file(openpose_weights), pth)
    expected = library_openpose(pth, np.asarray(shapes((128, 128))), 128)
    assert (expected > 0).any()  # bodies drawn, not a black map
    assert np.array_equal(as_array(pose_map), as_array(fit(Image.fromarray(expected), 64, 64, "just_resize")))


def test_an_openpose_unit_equals_its_precomputed_map_through_the_engine(pose_engine, pose_map):
    source = b64(shapes((128, 128)))
    with_module = pose_engine.generate(GenerationRequest(**FAST, controlnets=[
        {**UNIT, "image": source, "preprocessor": "OpenPose", "processor_res": 128}]))
    with_map = pose_engine.generate(GenerationRequest(**FAST, controlnets=[{**UNIT, "image": b64(pose_map)}]))
    black = pose_engine.generate(GenerationRequest(**FAST, controlnets=[
        {**UNIT, "image": b64(Image.new("RGB", (64, 64)))}]))
    assert np.array_equal(pixels(with_module), pixels(with_map))
    assert not np.array_equal(pixels(with_module), pixels(black))


def test_openpose_without_its_weights_is_refused(engine):
    assert "openpose" not in engine.controlnets.preprocessors.names()  # the repository's manifest has no twin


def library_lineart_anime(tiny_bucket):
    """controlnet_aux's LineartAnimeDetector on the twin, its U-Net built as the detector builds netG.pth's (ngf 8)."""
    module = import_controlnet_aux("lineart_anime")
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    network = module.UnetGenerator(3, 1, 8, 8, norm_layer=norm, use_dropout=False)
    network.load_state_dict(load_file(tiny_bucket / "tiny-preprocessors" / "tiny-lineart-anime.safetensors"))
    return module.LineartAnimeDetector(network.eval())


@pytest.mark.parametrize("resolution", [64, 320])  # padded to 64 x 128 / 320 x 384: the net pads to 256 / 512
def test_lineart_anime_equals_controlnet_aux(engine, tiny_bucket, resolution):
    source = shapes()
    ours = control_image(source, width=64, height=64, preprocessor="lineart_anime", resize_mode="crop_and_resize",
                         processor_res=resolution, preprocessors=engine.controlnets.preprocessors)
    padded, (height, width) = extension_pad(np.asarray(source), resolution)  # the extension's geometry
    side = min(padded.shape[:2])  # the library's own resizing then keeps the padded size
    theirs = library_lineart_anime(tiny_bucket)(padded, detect_resolution=side, image_resolution=side,
                                                output_type="np")
    assert theirs.shape[:2] == padded.shape[:2]
    expected = as_array(fit(Image.fromarray(theirs[:height, :width]).convert("RGB"), 64, 64, "crop_and_resize"))
    assert np.array_equal(as_array(ours), expected)
    assert expected.std() > 0


def test_a_lineart_anime_unit_equals_its_precomputed_map_through_the_engine(engine):
    source = shapes()
    control = control_image(source, width=64, height=64, preprocessor="lineart_anime", resize_mode="just_resize",
                            processor_res=64, preprocessors=engine.controlnets.preprocessors)
    with_module = engine.generate(GenerationRequest(**FAST, controlnets=[
        {**UNIT, "image": b64(source), "preprocessor": "lineart_anime", "processor_res": 64}]))
    with_map = engine.generate(GenerationRequest(**FAST, controlnets=[{**UNIT, "image": b64(control)}]))
    raw = engine.generate(GenerationRequest(**FAST, controlnets=[{**UNIT, "image": b64(source)}]))
    assert np.array_equal(pixels(with_module), pixels(with_map))
    assert not np.array_equal(pixels(with_module), pixels(raw))


def test_the_loaders_read_sizes_and_layouts_off_the_state():
    module = import_controlnet_aux("lineart_anime")
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    torch.manual_seed(0)
    state = module.UnetGenerator(3, 1, 6, 4, norm_layer=norm).state_dict()  # 6 levels of width 4
    built = build_network("lineart_anime", {f"module.{key}": value for key, value in state.items()})  # DataParallel
    assert all(torch.equal(built.state_dict()[key], value) for key, value in state.items())
    assert len(built.state_dict()) == len(state)
    pose = import_controlnet_aux("open_pose.model").bodypose_model().state_dict()
    built = build_network("openpose", dict(pose))  # the model's own key layout loads too
    assert torch.equal(built.state_dict()["model6_2.Mconv7_stage6_L2.bias"], pose["model6_2.Mconv7_stage6_L2.bias"])
    with pytest.raises(ValueError, match="not an openpose body state dict"):
        build_network("openpose", {key.split(".", 1)[1]: value for key, value in list(pose.items())[2:]})


def test_damaged_openpose_weights_are_refused_naming_the_entry(engine_settings, tmp_path):
    from safetensors.torch import save_file

    models = tmp_path / "models"
    models.mkdir()
    save_file({"conv1_1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "pose.safetensors")
    (models / "_preprocessors.yaml").write_text(yaml.safe_dump({"preprocessors": [
        {"name": "openpose", "uri": str(tmp_path / "pose.safetensors")}]}))
    preprocessors = Preprocessors(dataclasses.replace(engine_settings, models_dir=models))
    with pytest.raises(ManifestError, match="preprocessor weights 'openpose' .*cannot load them"):
        preprocessors.run("openpose", shapes(), 64)
