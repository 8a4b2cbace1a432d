"""ControlNet units (`controlnets`): equal to bare diffusers' ControlNet pipelines, skipped at scale 0, several at
once (MultiControlNet), canny preprocessing, img2img/inpaint, SDXL, wrong-architecture refusal, no mixing."""

import io
import threading

import numpy as np
import pytest
from PIL import Image

from sd_core.control_images import canny, control_image
from sd_core.errors import InvalidRequest, ModelNotFound
from sd_core.schema import GenerationRequest
from tests.fixtures.controlnet import BareControlNet, as_array, picture, unit
from tests.fixtures.images import png_b64 as b64

FAST = {"prompt": "a house", "seed": 5, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64, "height": 64,
        "scheduler": "Euler", "model": "tiny-sd15"}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def bare(tiny_bucket, names, mode="txt2img", arch="sd15", **kwargs):
    """The same generation through bare diffusers: the ControlNet pipeline made from the plain one with from_pipe."""
    maker = BareControlNet(tiny_bucket, arch)
    nets = [maker.net(name) for name in names]
    suffix = {"txt2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}[mode]
    pipe = maker.make(suffix, controlnet=nets[0] if len(nets) == 1 else nets)
    return as_array(maker.run(pipe, prompt=FAST["prompt"], num_inference_steps=2, **kwargs))


@pytest.fixture(scope="module")
def plain(engine):
    return pixels(engine.generate(GenerationRequest(**FAST)))


def test_one_unit_changes_the_image_and_equals_bare_diffusers(engine, plain, tiny_bucket):
    result = engine.generate(GenerationRequest(**FAST, controlnets=[unit(scale=0.8, end=0.5)]))
    expected = bare(tiny_bucket, ["tiny-sd15-control-a"], image=picture(1), width=64, height=64,
                    controlnet_conditioning_scale=0.8, control_guidance_end=0.5)
    assert np.array_equal(pixels(result), expected)
    assert np.abs(pixels(result) - plain).mean() > 2, np.abs(pixels(result) - plain).mean()


def test_control_mode_is_guess_mode(engine, tiny_bucket):
    result = engine.generate(GenerationRequest(**FAST, controlnets=[unit(mode="control")]))
    expected = bare(tiny_bucket, ["tiny-sd15-control-a"], image=picture(1), width=64, height=64, guess_mode=True)
    assert np.array_equal(pixels(result), expected)


def test_scale_zero_or_no_units_give_exactly_the_plain_image(engine, plain):
    assert np.array_equal(pixels(engine.generate(GenerationRequest(**FAST, controlnets=[unit(scale=0)]))), plain)
    assert np.array_equal(pixels(engine.generate(GenerationRequest(**FAST, controlnets=[]))), plain)


def test_two_units_equal_bare_multicontrolnet(engine, tiny_bucket):
    units = [unit(scale=0.7), unit("tiny-control-b", seed=2, scale=1.2, start=0.5)]
    result = engine.generate(GenerationRequest(**FAST, controlnets=units))
    expected = bare(tiny_bucket, ["tiny-sd15-control-a", "tiny-sd15-control-b"], image=[picture(1), picture(2)],
                    width=64, height=64, controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.5],
                    control_guidance_end=[1.0, 1.0])
    assert np.array_equal(pixels(result), expected)


def test_canny_unit_runs_canny_on_the_control_image(engine, tiny_bucket):
    shapes = Image.new("RGB", (64, 64))
    shapes.paste((255, 255, 255), (16, 16, 48, 40))
    result = engine.generate(GenerationRequest(**FAST, controlnets=[
        {"model": "tiny-control-a", "image": b64(shapes), "preprocessor": "canny"}]))
    edges = Image.fromarray(canny(np.asarray(shapes), 100, 200)).convert("RGB")
    expected = bare(tiny_bucket, ["tiny-sd15-control-a"], image=edges, width=64, height=64)
    assert np.array_equal(pixels(result), expected)


def test_canny_finds_the_outline_of_a_rectangle():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[16:40, 16:48] = 200
    edges = canny(image, 100, 200)
    assert set(np.unique(edges)) == {0, 255}
    assert edges[:10].max() == 0 and edges[28, 24:40].max() == 0  # flat areas: no edges
    assert edges[14:18, 24:40].max(axis=0).min() == 255 and edges[38:42, 24:40].max(axis=0).min() == 255
    assert edges[20:36, 14:18].max(axis=1).min() == 255 and edges[20:36, 46:50].max(axis=1).min() == 255
    faint = np.zeros((64, 64, 3), dtype=np.uint8)
    faint[:, 32:] = 30  # a step of 30: Sobel L1 gradient 120, between the thresholds below
    assert not canny(faint, 100, 200).any()  # no strong pixel: hysteresis keeps nothing
    assert canny(faint, 100, 110)[:, 30:34].max(axis=1).min() == 255  # strong: the whole line
    assert not canny(np.full((64, 64, 3), 90, np.uint8), 100, 200).any()


def test_resize_modes_fit_the_output_size():
    wide = picture(3, (128, 64))
    for mode in ("just_resize", "crop_and_resize", "resize_and_fill"):
        assert control_image(wide, width=64, height=64, preprocessor="none", resize_mode=mode).size == (64, 64)
    filled = np.asarray(control_image(wide, width=64, height=64, preprocessor="none", resize_mode="resize_and_fill"))
    assert filled[:8].max() == 0 and filled[-8:].max() == 0  # padded above and below
    thin = picture(4, (4000, 8))  # processor_res 2048 on its short side would be 1M x 2048 pixels: bounded
    from sd_core.control_images import MAX_PROCESSOR_PIXELS, at_resolution

    scaled = at_resolution(thin, 2048)
    assert scaled.width * scaled.height <= MAX_PROCESSOR_PIXELS * 1.01


def test_img2img_and_inpaint_with_a_unit_equal_bare_diffusers(engine, tiny_bucket):
    init = picture(7)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    img2img = engine.generate(GenerationRequest(**FAST, image=b64(init), strength=0.9, controlnets=[unit()]))
    expected = bare(tiny_bucket, ["tiny-sd15-control-a"], mode="img2img", image=init, control_image=picture(1),
                    strength=0.9, controlnet_conditioning_scale=1.0)
    assert np.array_equal(pixels(img2img), expected)
    inpaint = engine.generate(GenerationRequest(**FAST, image=b64(init), mask=b64(mask.convert("RGB")), strength=0.9,
                                                controlnets=[unit()]))
    expected = bare(tiny_bucket, ["tiny-sd15-control-a"], mode="inpaint", image=init, mask_image=mask,
                    control_image=picture(1), strength=0.9, width=64, height=64, controlnet_conditioning_scale=1.0)
    assert np.array_equal(pixels(inpaint), expected)


def test_sdxl_unit_equals_bare_diffusers(engine, tiny_bucket):
    request = {**FAST, "model": "tiny-sdxl"}
    result = engine.generate(GenerationRequest(**request, controlnets=[unit("tiny-xl-control")]))
    plain = engine.generate(GenerationRequest(**request))
    expected = bare(tiny_bucket, ["tiny-sdxl-control-a"], arch="sdxl", image=picture(1), width=64, height=64)
    assert np.array_equal(pixels(result), expected)
    assert np.abs(pixels(result) - pixels(plain)).mean() > 0.5


def test_wrong_architecture_and_unknown_names_are_refused(engine):
    with pytest.raises(InvalidRequest) as refused:
        engine.generate(GenerationRequest(**FAST, controlnets=[unit("tiny-xl-control")]))
    assert str(refused.value).startswith("controlnets.0.model: ControlNet 'tiny-xl-control' is made for another")
    assert "tiny-sd15" in str(refused.value)
    with pytest.raises(ModelNotFound, match="controlnets.0.model: unknown ControlNet 'nope'.*tiny-control-a"):
        engine.generate(GenerationRequest(**FAST, controlnets=[unit("nope")]))


def test_unsupported_preprocessors_and_modes_are_refused(engine):
    from sd_core.schema import parse_request

    with pytest.raises(InvalidRequest, match="preprocessor: 'depth' is not available.*available: none, canny"):
        parse_request({**FAST, "controlnets": [unit(preprocessor="depth")]})
    with pytest.raises(InvalidRequest, match="controlnets: 'control' .* all units must use it or none"):
        engine.generate(GenerationRequest(**FAST, controlnets=[unit(mode="prompt"), unit("tiny-control-b",
                                                                                          mode="control")]))
    with pytest.raises(InvalidRequest, match="start"):
        parse_request({**FAST, "controlnets": [unit(start=0.6, end=0.5)]})


def test_controlnet_jobs_never_batch_and_concurrent_requests_never_mix(make_engine):
    engine = make_engine(max_batch_images=8)
    requests = [GenerationRequest(**FAST, controlnets=[unit(seed=1)]), GenerationRequest(**FAST),
                GenerationRequest(**FAST, controlnets=[unit("tiny-control-b", seed=2)])]
    alone = [pixels(engine.generate(request)) for request in requests]
    jobs = [engine.prepare(request) for request in requests]
    assert jobs[0].batch_key is None and jobs[2].batch_key is None and jobs[1].batch_key is not None
    together = [None] * len(requests)

    def run(index):
        together[index] = pixels(engine.generate(requests[index]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, other in zip(alone, together, strict=True):
        assert np.array_equal(one, other)
    assert len({one.tobytes() for one in alone}) == 3


def test_loaded_controlnets_are_a_small_lru_counted_in_the_memory_budget(make_engine):
    engine = make_engine(controlnet_max_loaded=1)
    engine.generate(GenerationRequest(**FAST, controlnets=[unit()]))
    assert engine.controlnets.loaded == ["tiny-control-a"]
    size = engine.controlnets.nbytes()
    assert size > 0
    first = engine.controlnets._loaded[("tiny-sd15", "tiny-control-a")]
    engine.generate(GenerationRequest(**FAST, image=b64(picture(7)), controlnets=[unit("tiny-control-b")]))
    assert engine.controlnets.loaded == ["tiny-control-b"]
    pipes = engine.pool.get("tiny-sd15").pipes
    assert pipes[("controlnet", "txt2img")].controlnet is None  # the unloaded one is not kept alive by a pipeline
    assert pipes[("controlnet", "img2img")].controlnet is not first
    assert engine.pool.extra_bytes() == engine.controlnets.nbytes()
