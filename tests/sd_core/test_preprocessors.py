"""Weight-based ControlNet preprocessors (sd_core/preprocessors.py): the same maps as the A1111 extension's steps
(resize_image_with_pad, the annotator, remove_pad) on the same weights, a lineart unit through the Engine equal to
its precomputed map, unknown/weight-less modules and pickle weights refused."""

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd_core.control_images import control_image, detected_map, fit
from sd_core.errors import InvalidRequest, UnsafeCheckpoint
from sd_core.preprocessors import Preprocessors, build_network, import_controlnet_aux
from sd_core.schema import GenerationRequest, parse_request
from tests.sd_core.test_controlnet import FAST, as_array, b64, pixels

WORKER_MODULES = ["none", "canny", "lineart_standard", "lineart_realistic", "lineart_coarse", "softedge_pidinet",
                  "softedge_pidisafe", "scribble_pidinet", "depth_anything", "depth_anything_v2", "mlsd",
                  "lineart_anime"]


def shapes(size=(96, 80)) -> Image.Image:
    """A picture with edges worth detecting: a few rectangles and a disc on a gradient, with a little noise."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], -1).astype(np.float32)
    image[10:40, 12:50] = (230, 40, 40)
    image[50:75, 55:90] = (20, 200, 60)
    image[(x - 30) ** 2 + (y - 60) ** 2 < 150] = (250, 250, 250)
    image += np.random.default_rng(3).normal(0, 6, image.shape)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def preprocessors(engine_settings):
    return Preprocessors(engine_settings)


def library_network(tiny_bucket, weights: str):
    """The twin's network built and loaded by controlnet_aux's own classes."""
    if weights == "pidinet":
        network = import_controlnet_aux("pidi.model").pidinet()
        network.load_state_dict(load_file(tiny_bucket / "tiny-preprocessors" / "tiny-pidinet.safetensors"))
        return network.eval()
    files = {"lineart": "tiny-lineart.safetensors", "lineart_coarse": "tiny-lineart-coarse.safetensors"}
    network = import_controlnet_aux("lineart").Generator(3, 1, 1)
    network.load_state_dict(load_file(tiny_bucket / "tiny-preprocessors" / files[weights]))
    return network.eval()


def extension_pad(rgb: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The A1111 extension's resize_image_with_pad, written out: short side to ``resolution`` (each side rounded),
    cubic up / area down, edge-padded on the bottom and right to multiples of 64; and the unpadded (height, width)."""
    h_raw, w_raw = rgb.shape[:2]
    k = resolution / min(h_raw, w_raw)
    height, width = int(np.round(h_raw * k)), int(np.round(w_raw * k))
    image = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad = [[0, int(np.ceil(height / 64) * 64 - height)], [0, int(np.ceil(width / 64) * 64 - width)], [0, 0]]
    return np.pad(image, pad, mode="edge"), (height, width)


def extension_scribble(edges: np.ndarray) -> np.ndarray:
    """scribble_pidinet's step after remove_pad, as the extension writes it (annotator/util.py's nms)."""
    result = import_controlnet_aux("util").nms(edges, 127, 3.0)
    result = cv2.GaussianBlur(result, (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return result


def extension_map(module: str, network, rgb: np.ndarray, resolution: int) -> np.ndarray:
    """The extension's map (H x W uint8) of ``rgb`` by ``module``: its annotator's steps on the padded image, the
    padding cropped away, then (scribble_pidinet) the scribble step."""
    image, (height, width) = extension_pad(rgb, resolution)
    tensor = torch.from_numpy(image.copy()).float().permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        if module.startswith("lineart_") and module != "lineart_standard":
            line = (network(tensor)[0][0].numpy() * 255.0).clip(0, 255).astype(np.uint8)
            result = 255 - line
        elif module == "lineart_standard":
            x = image.astype(np.float32)
            intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
            intensity /= max(16, np.median(intensity[intensity > 8]))
            result = (intensity * 127).clip(0, 255).astype(np.uint8)
        else:  # pidinet: BGR input, the last output, safe_step for pidisafe
            edge = network(torch.from_numpy(image[:, :, ::-1].copy()).float().permute(2, 0, 1)[None] / 255.0)[-1]
            edge = edge.numpy()
            if module == "softedge_pidisafe":
                edge = import_controlnet_aux("util").safe_step(edge)
            result = (edge * 255.0).clip(0, 255).astype(np.uint8)[0, 0]
    result = result[:height, :width]
    return extension_scribble(result) if module == "scribble_pidinet" else result


@pytest.mark.parametrize("module, weights", [
    ("lineart_realistic", "lineart"),
    ("lineart_coarse", "lineart_coarse"),
    ("softedge_pidinet", "pidinet"),
    ("softedge_pidisafe", "pidinet"),
    ("scribble_pidinet", "pidinet"),
    ("lineart_standard", None),
])
def test_each_module_equals_the_extension_steps_on_the_same_weights(preprocessors, tiny_bucket, module, weights):
    """At odd sizes too: a 70 x 90 image at 128 is detected at 128 x 165 (padded to 128 x 192) and the map is
    128 x 165 (controlnet_aux's own sizing would detect at 128 x 192 and stretch)."""
    network = library_network(tiny_bucket, weights) if weights else None
    for size, resolution in (((96, 80), 128), ((70, 90), 128), ((70, 90), 64)):
        source = shapes(size)
        expected = extension_map(module, network, np.asarray(source), resolution)
        width, height = size
        k = resolution / min(size)
        assert expected.shape == (int(np.round(height * k)), int(np.round(width * k)))
        ours = detected_map(source, width=64, height=64, preprocessor=module, resize_mode="crop_and_resize",
                            processor_res=resolution, preprocessors=preprocessors)
        assert ours.size == expected.shape[::-1]
        assert np.array_equal(as_array(ours)[..., 0], expected) and np.ptp(as_array(ours), 2).max() == 0
        assert expected.std() > 0  # a map, not a blank
    fitted = control_image(source, width=64, height=64, preprocessor=module, resize_mode="crop_and_resize",
                           processor_res=resolution, preprocessors=preprocessors)
    assert np.array_equal(as_array(fitted), as_array(fit(ours, 64, 64, "crop_and_resize")))


def test_processor_res_changes_the_map_and_the_two_lineart_weights_differ(preprocessors):
    source = shapes()

    def run(module, res):
        return as_array(control_image(source, width=64, height=64, preprocessor=module, resize_mode="just_resize",
                                      processor_res=res, preprocessors=preprocessors))

    assert not np.array_equal(run("lineart_realistic", 64), run("lineart_realistic", 192))
    assert not np.array_equal(run("lineart_realistic", 128), run("lineart_coarse", 128))


def test_hed_network_equals_controlnet_aux(engine_settings):
    """HED (no twin in the bucket: 60 MB at its fixed size) built from a random state dict like the loader does."""
    hed = import_controlnet_aux("hed")
    torch.manual_seed(0)
    state = hed.ControlNetHED_Apache2().state_dict()
    theirs = hed.ControlNetHED_Apache2()
    theirs.load_state_dict(state)
    source = np.asarray(shapes((64, 64)))
    for options in ({}, {"safe": True}, {"scribble": True}):
        expected = hed.HEDdetector(theirs.float().eval())(source, detect_resolution=64, image_resolution=64, **options)
        got = hed.HEDdetector(build_network("hed", dict(state)))(source, detect_resolution=64, image_resolution=64,
                                                                  **options)
        assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_a_lineart_unit_equals_its_precomputed_map_through_the_engine(engine, preprocessors):
    source = shapes()
    control = control_image(source, width=64, height=64, preprocessor="lineart_realistic", resize_mode="just_resize",
                            processor_res=128, preprocessors=preprocessors)
    unit = {"model": "tiny-control-a", "scale": 1.0}
    with_module = engine.generate(GenerationRequest(**FAST, controlnets=[
        {**unit, "image": b64(source), "preprocessor": "Lineart_Realistic", "processor_res": 128}]))
    with_map = engine.generate(GenerationRequest(**FAST, controlnets=[{**unit, "image": b64(control)}]))
    raw = engine.generate(GenerationRequest(**FAST, controlnets=[{**unit, "image": b64(source)}]))
    assert np.array_equal(pixels(with_module), pixels(with_map))
    assert not np.array_equal(pixels(with_module), pixels(raw))


def test_unknown_and_weightless_modules_are_refused_with_the_list(engine, preprocessors):
    assert preprocessors.names() == WORKER_MODULES
    assert engine.controlnets.preprocessors.names() == WORKER_MODULES
    with pytest.raises(InvalidRequest, match=r"preprocessor: 'depth_zoe' is not available on this worker \(its "
                                             r"network needs timm and torchvision, which this worker does not "
                                             r"install\); available: none, canny, lineart_standard, lineart_realistic"):
        parse_request({**FAST, "controlnets": [{"model": "tiny-control-a", "image": "x", "preprocessor": "depth_zoe"}]})
    request = GenerationRequest(**FAST, controlnets=[{"model": "tiny-control-a", "image": b64(shapes()),
                                                      "preprocessor": "softedge_hed"}])
    with pytest.raises(InvalidRequest) as refused:
        engine.generate(request)
    assert str(refused.value) == ("controlnets.0.preprocessor: 'softedge_hed' has no weights on this worker; "
                                  f"available: {', '.join(WORKER_MODULES)}")


def test_pickle_weights_are_refused(engine_settings, tmp_path):
    import_controlnet_aux("lineart")
    bucket, models = tmp_path / "bucket", tmp_path / "models"
    bucket.mkdir()
    models.mkdir()
    network = import_controlnet_aux("lineart").Generator(3, 1, 1)
    torch.save(network.state_dict(), bucket / "sk_model.pth")
    (models / "_preprocessors.yaml").write_text("preprocessors:\n  - name: lineart\n    uri: sk_model.pth\n")
    settings = dataclasses.replace(engine_settings, models_dir=models, weights_uri=str(bucket),
                                   cache_dir=tmp_path / "cache")
    with pytest.raises(UnsafeCheckpoint) as refused:
        Preprocessors(settings).run("lineart", shapes(), 64, field="controlnets.0.preprocessor")
    assert str(refused.value).startswith("controlnets.0.preprocessor: sk_model.pth: pickle checkpoints")
    allowed = Preprocessors(dataclasses.replace(settings, allow_pickle=True)).run("lineart", shapes(), 64)
    assert allowed.size == (77, 64)  # 96 x 80 with its short side at 64 (the extension: no rounding to 64)
