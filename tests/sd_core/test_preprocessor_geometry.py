"""ControlNet preprocessor geometry and memory: canny at an odd size has the A1111 extension's map size and alignment
(resize_image_with_pad / remove_pad), through the Engine too; preprocessor networks count in SD_PIPELINE_MEMORY_MB."""

import numpy as np
import pytest
from PIL import Image

from sd_core.control_images import canny, control_image, detected_map
from sd_core.schema import GenerationRequest
from tests.sd_core.test_controlnet import FAST, as_array, b64, pixels
from tests.sd_core.test_preprocessors import extension_pad, shapes


def drawing() -> Image.Image:
    """70 x 90: a light rectangle from (15, 25) to (50, 70) (exclusive) on a dark ground."""
    image = Image.new("RGB", (70, 90), (20, 20, 20))
    image.paste((230, 230, 230), (15, 25, 50, 70))
    return image


def extension_canny(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """The extension's canny: resize_image_with_pad, Canny on the padded image (this worker's Canny), remove_pad."""
    image, (height, width) = extension_pad(rgb, resolution)
    return canny(image, 100, 200)[:height, :width]


@pytest.mark.parametrize("resolution", [128, 64, 97])
def test_canny_at_an_odd_size_has_the_extensions_size_and_alignment(resolution):
    source = drawing()
    k = resolution / 70
    size = (resolution, int(np.round(90 * k)))  # the short side at the resolution, the other rounded: no 64 multiple
    ours = detected_map(source, width=64, height=64, preprocessor="canny", resize_mode="just_resize",
                        processor_res=resolution)
    assert ours.size == size
    edges = as_array(ours)[..., 0]
    assert np.array_equal(edges, extension_canny(np.asarray(source), resolution))
    rows, columns = np.nonzero(edges)
    # the rectangle's outline where the formula puts it (controlnet_aux's sizing, 90 -> a multiple of 64, would move
    # the bottom edge from 70 k to 70 k * round(90 k / 64) * 64 / (90 k): at 128, row 149 instead of 128)
    for found, expected in ((rows.min(), 25 * k), (rows.max(), 70 * k), (columns.min(), 15 * k),
                            (columns.max(), 50 * k)):
        assert abs(found - expected) <= 2, (found, expected)


def test_canny_unit_at_an_odd_size_equals_a_none_unit_on_the_extensions_map(engine):
    source = drawing()
    expected = Image.fromarray(extension_canny(np.asarray(source), 128)).convert("RGB")
    assert expected.size == (128, 165)
    unit = {"model": "tiny-control-a", "scale": 1.0, "resize_mode": "crop_and_resize"}
    with_module = engine.generate(GenerationRequest(**FAST, controlnets=[
        {**unit, "image": b64(source), "preprocessor": "canny", "processor_res": 128}]))
    with_map = engine.generate(GenerationRequest(**FAST, controlnets=[{**unit, "image": b64(expected)}]))
    assert np.array_equal(pixels(with_module), pixels(with_map))


def test_preprocessor_networks_count_in_the_model_budget(make_engine):
    """With a 1 MB budget a second network unloads the first (least recently used); the maps stay the same. With room
    for both, both stay. The pool counts them with the ControlNets."""
    source = shapes((70, 90))

    def run(engine, module):
        return as_array(control_image(source, width=64, height=64, preprocessor=module, resize_mode="just_resize",
                                      processor_res=64, preprocessors=engine.controlnets.preprocessors))

    small = make_engine(pipeline_memory_mb=1)
    networks = small.controlnets.preprocessors
    first = run(small, "mlsd")
    assert networks.loaded == ["mlsd"]
    assert networks.nbytes() > 2**20 and small.pool.extra_bytes() == networks.nbytes() + small.controlnets.nbytes()
    soft = run(small, "softedge_pidinet")
    assert networks.loaded == ["pidinet"]
    assert np.array_equal(run(small, "mlsd"), first)  # loaded again: the same map
    assert networks.loaded == ["mlsd"]
    roomy = make_engine(pipeline_memory_mb=4096)
    assert np.array_equal(run(roomy, "softedge_pidinet"), soft) and np.array_equal(run(roomy, "mlsd"), first)
    assert roomy.controlnets.preprocessors.loaded == ["pidinet", "mlsd"]
