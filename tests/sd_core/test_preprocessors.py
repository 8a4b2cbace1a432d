"""Weight-based ControlNet preprocessors (sd_core/preprocessors.py): the same maps as controlnet_aux's own detectors on
the same weights, a lineart unit through the Engine equal to its precomputed map, unknown/weight-less modules and
pickle weights refused."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd_core.control_images import control_image, fit
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


def library_detector(tiny_bucket, weights: str):
    """controlnet_aux's own detector on the twin's weights, its network built and loaded by the library's classes."""
    if weights == "pidinet":
        network = import_controlnet_aux("pidi.model").pidinet()
        network.load_state_dict(load_file(tiny_bucket / "tiny-preprocessors" / "tiny-pidinet.safetensors"))
        return import_controlnet_aux("pidi").PidiNetDetector(network.eval())
    lineart = import_controlnet_aux("lineart")
    files = {"lineart": "tiny-lineart.safetensors", "lineart_coarse": "tiny-lineart-coarse.safetensors"}
    network = lineart.Generator(3, 1, 1)
    network.load_state_dict(load_file(tiny_bucket / "tiny-preprocessors" / files[weights]))
    return lineart.LineartDetector(network.eval(), network.eval())


@pytest.mark.parametrize("module, weights, options", [
    ("lineart_realistic", "lineart", {"coarse": False}),
    ("lineart_coarse", "lineart_coarse", {"coarse": True}),
    ("softedge_pidinet", "pidinet", {}),
    ("softedge_pidisafe", "pidinet", {"safe": True}),
    ("scribble_pidinet", "pidinet", {"scribble": True}),
    ("lineart_standard", None, None),
])
def test_each_module_equals_controlnet_aux_on_the_same_weights(preprocessors, tiny_bucket, module, weights, options):
    source = shapes()
    ours = control_image(source, width=64, height=64, preprocessor=module, resize_mode="crop_and_resize",
                         processor_res=128, preprocessors=preprocessors)
    if weights is None:
        theirs = import_controlnet_aux("lineart_standard").LineartStandardDetector()(
            np.asarray(source), detect_resolution=128, output_type="pil")
    else:
        theirs = library_detector(tiny_bucket, weights)(np.asarray(source), detect_resolution=128,
                                                        image_resolution=128, output_type="pil", **options)
    expected = as_array(fit(theirs.convert("RGB"), 64, 64, "crop_and_resize"))
    assert ours.size == (64, 64)
    assert np.array_equal(as_array(ours), expected)
    assert expected.std() > 0  # a map, not a blank


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
    assert allowed.size == (64, 64)
