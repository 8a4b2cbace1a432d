"""The depth_anything and mlsd ControlNet preprocessors: depth equals transformers' own model (loaded by transformers
from the hub layout) run through the A1111 extension's steps, written out here; mlsd equals controlnet_aux's detector
on the same weights at each threshold; an mlsd unit through the Engine equals its precomputed map; openpose with
hands or face refused, saying why."""

import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from devtools.tiny_depth import tiny_config
from sd_core import a1111
from sd_core.control_images import control_image, fit
from sd_core.errors import InvalidRequest
from sd_core.preprocessor_names import slider_options
from sd_core.preprocessors import Preprocessors, import_controlnet_aux
from sd_core.schema import ControlNetUnit, GenerationRequest, parse_request
from tests.sd_core.test_controlnet import FAST, as_array, b64, pixels
from tests.sd_core.test_preprocessors import shapes


@pytest.fixture(scope="module")
def preprocessors(engine_settings):
    return Preprocessors(engine_settings)


def extension_depth(model, rgb: np.ndarray, resolution: int) -> np.ndarray:
    """The A1111 extension's depth_anything on ``rgb``: resize_image_with_pad, DepthAnythingDetector (its BGR2RGB
    conversion of an RGB image, Resize to >= 518 in multiples of 14, normalisation), then remove_pad."""
    h_raw, w_raw = rgb.shape[:2]
    k = resolution / min(h_raw, w_raw)
    h_target, w_target = int(np.round(h_raw * k)), int(np.round(w_raw * k))
    image = cv2.resize(rgb, (w_target, h_target), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad = [[0, int(np.ceil(h_target / 64) * 64 - h_target)], [0, int(np.ceil(w_target / 64) * 64 - w_target)], [0, 0]]
    image = np.pad(image, pad, mode="edge")
    h, w = image.shape[:2]
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) / 255.0
    scale = max(518 / h, 518 / w)

    def multiple(x):
        y = int(np.round(x / 14) * 14)
        return int(np.ceil(x / 14) * 14) if y < 518 else y

    image = cv2.resize(image, (multiple(scale * w), multiple(scale * h)), interpolation=cv2.INTER_CUBIC)
    image = (image - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    batch = torch.from_numpy(np.ascontiguousarray(np.transpose(image, (2, 0, 1))).astype(np.float32))[None]
    with torch.no_grad():
        depth = model(batch).predicted_depth
    depth = torch.nn.functional.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
    return depth.numpy().astype(np.uint8)[:h_target, :w_target]


@pytest.mark.parametrize("module, version, filename", [
    ("depth_anything", 1, "tiny-depth-anything.safetensors"),
    ("depth_anything_v2", 2, "tiny-depth-anything-v2.safetensors"),
])
def test_depth_anything_equals_transformers_model_through_the_extension_steps(preprocessors, tiny_bucket, tmp_path,
                                                                              module, version, filename):
    from transformers import DepthAnythingForDepthEstimation

    folder = tmp_path / "depth-anything-tiny-hf"  # a hub-like folder: transformers loads (and renames) the twin itself
    tiny_config(version).save_pretrained(folder)
    shutil.copy(tiny_bucket / "tiny-preprocessors" / filename, folder / "model.safetensors")
    model = DepthAnythingForDepthEstimation.from_pretrained(folder).float().eval()
    source = shapes()  # 96 x 80: detected at 77 x 64, padded to 128 x 64, the network sees 1036 x 518
    expected = extension_depth(model, np.asarray(source), 64)
    assert expected.shape == (64, 77) and expected.std() > 0
    ours = control_image(source, width=64, height=64, preprocessor=module, resize_mode="crop_and_resize",
                         processor_res=64, preprocessors=preprocessors)
    assert np.array_equal(as_array(ours), as_array(fit(Image.fromarray(expected).convert("RGB"), 64, 64,
                                                       "crop_and_resize")))


@pytest.fixture(scope="module")
def library_mlsd(tiny_bucket):
    """controlnet_aux's own MLSDdetector on the twin's weights, its network built and loaded by the library's class."""
    network = import_controlnet_aux("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large()
    network.load_state_dict(load_file(tiny_bucket / "tiny-preprocessors" / "tiny-mlsd.safetensors"), strict=True)
    return import_controlnet_aux("mlsd").MLSDdetector(network.eval())


def test_mlsd_equals_controlnet_aux_at_each_threshold(preprocessors, library_mlsd):
    source = shapes((128, 128))
    maps = []
    for value, distance in ((0.1, 0.1), (0.9, 0.1), (0.1, 1.5)):
        unit = ControlNetUnit(model="m", image="x", preprocessor="mlsd", value_threshold=value,
                              distance_threshold=distance)
        ours = as_array(control_image(source, width=64, height=64, preprocessor="mlsd", resize_mode="just_resize",
                                      processor_res=128, preprocessors=preprocessors,
                                      options=slider_options("mlsd", unit)))
        theirs = library_mlsd(np.asarray(source), thr_v=value, thr_d=distance, detect_resolution=128,
                              image_resolution=128)
        assert np.array_equal(ours, as_array(fit(theirs.convert("RGB"), 64, 64, "just_resize")))
        assert (np.asarray(theirs) == 255).any()  # lines, not a blank map
        maps.append(ours)
    assert not np.array_equal(maps[0], maps[1]) and not np.array_equal(maps[0], maps[2])


def test_an_mlsd_unit_equals_its_precomputed_map_through_the_engine(engine, preprocessors):
    source = shapes((128, 128))
    options = {"thr_v": 0.1, "thr_d": 5.0}
    control = control_image(source, width=64, height=64, preprocessor="mlsd", resize_mode="just_resize",
                            processor_res=128, preprocessors=preprocessors, options=options)
    unit = {"model": "tiny-control-a", "scale": 1.0}
    with_module = engine.generate(GenerationRequest(**FAST, controlnets=[
        {**unit, "image": b64(source), "preprocessor": "MLSD", "processor_res": 128, "distance_threshold": 5.0}]))
    with_map = engine.generate(GenerationRequest(**FAST, controlnets=[{**unit, "image": b64(control)}]))
    default = engine.generate(GenerationRequest(**FAST, controlnets=[
        {**unit, "image": b64(source), "preprocessor": "mlsd", "processor_res": 128}]))
    assert np.array_equal(pixels(with_module), pixels(with_map))
    assert not np.array_equal(pixels(with_module), pixels(default))  # the distance threshold reached the detector


def test_a1111_mlsd_thresholds_and_openpose_with_hands_or_face_refused():
    def translated(**unit):
        call = a1111.parse_call({"prompt": "p", "alwayson_scripts": {"controlnet": {"args": [
            {"image": "abc", "model": "tiny-control-a", **unit}]}}})
        return a1111.to_request(call).controlnets[0]

    unit = translated(module="mlsd", threshold_a=0.5, threshold_b=4)
    assert (unit.preprocessor, unit.value_threshold, unit.distance_threshold) == ("mlsd", 0.5, 4.0)
    unit = translated(module="mlsd", threshold_a=-1, threshold_b=-1)
    assert (unit.value_threshold, unit.distance_threshold, unit.low_threshold) == (0.1, 0.1, 100)
    unit = translated(module="depth_anything", threshold_a=0.5, threshold_b=4)  # no sliders: unused
    assert (unit.preprocessor, unit.value_threshold, unit.distance_threshold) == ("depth_anything", 0.1, 0.1)
    with pytest.raises(InvalidRequest, match=r"args\.0\.threshold_b: .*less than or equal to 20"):
        translated(module="mlsd", threshold_b=25)
    assert translated(module="OpenPose").preprocessor == "openpose"  # body only: sd_core/preprocessor_nets.py
    for name, why in (("openpose_hand", "scikit-image"), ("openpose_full", "scikit-image and torchvision"),
                      ("openpose_face", "torchvision"), ("dw_openpose_full", "ONNX")):
        with pytest.raises(InvalidRequest, match=f"'{name}' is not available on this worker \\(.*{why}"):
            parse_request({**FAST, "controlnets": [{"model": "tiny-control-a", "image": "x", "preprocessor": name}]})
        with pytest.raises(InvalidRequest, match=f"'{name}' is not available on this worker"):
            translated(module=name)


def test_depth_anything_refuses_a_very_elongated_image(preprocessors):
    with pytest.raises(InvalidRequest) as refused:
        preprocessors.run("depth_anything", Image.new("RGB", (900, 100)), 64, field="controlnets.0.preprocessor")
    assert str(refused.value) == ("controlnets.0.preprocessor: Depth Anything works on at least 518 pixels a side: a "
                                  "control image more than 8 times longer than wide is refused (got 576x64 at the "
                                  "preprocessor's resolution)")
