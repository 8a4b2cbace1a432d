"""Inpainting details and outpainting on the tiny models: mask blur and invert, only-masked crops, fills, overlay,
resize modes, the outpaint canvas; equal to bare diffusers wherever diffusers has the same operation."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from sd_core import inpainting
from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest, parse_request
from tests.fixtures.images import box_mask, noise_image
from tests.fixtures.images import png_b64 as png

PROMPT = "a red fox in the snow"
SETTINGS = {"num_inference_steps": 3, "guidance_scale": 7.0, "scheduler": "Euler", "strength": 0.9}


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    return engine.generate(GenerationRequest(**{"prompt": PROMPT, "seed": 3, **SETTINGS, **fields}))


@pytest.fixture(scope="module")
def init() -> Image.Image:
    return noise_image()


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    return box_mask((24, 16, 48, 40))


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    """Plain diffusers: the tiny SD1.5 inpaint pipeline with the engine's settings."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers",
                                                          local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")

    def run(image, mask_image, **kwargs) -> np.ndarray:
        with torch.inference_mode():
            out = pipe(prompt=PROMPT, image=image, mask_image=mask_image, num_inference_steps=3, guidance_scale=7.0,
                       strength=0.9, generator=[torch.Generator("cpu").manual_seed(3)], output_type="pil",
                       **{"width": 64, "height": 64, **kwargs}).images[0]
        return as_array(out)

    return run


def test_plain_inpaint_equals_bare_diffusers(engine, bare, init, mask):
    assert np.array_equal(pixels(generate(engine, image=png(init), mask=png(mask))), bare(init, mask))


def test_image_and_mask_of_another_size_are_resized_as_diffusers_does(engine, bare, init):
    big_init = init.resize((96, 80))
    big_mask = Image.new("L", (96, 80), 0)
    big_mask.paste(255, (30, 20, 61, 47))  # edges that fall between pixels at 64x64
    result = generate(engine, image=png(big_init), mask=png(big_mask), width=64, height=64)
    assert np.array_equal(pixels(result), bare(big_init, big_mask))


def test_mask_blur_changes_the_inpaint_and_equals_diffusers_given_the_blurred_mask(engine, bare, init, mask):
    plain = pixels(generate(engine, image=png(init), mask=png(mask)))
    blurred = pixels(generate(engine, image=png(init), mask=png(mask), mask_blur=8))
    assert np.abs(blurred - plain).mean() > 0.5
    assert np.array_equal(blurred, bare(init, inpainting.gaussian_blur(mask, 8, 8)))
    one_axis = pixels(generate(engine, image=png(init), mask=png(mask), mask_blur=8, mask_blur_y=0))
    assert np.array_equal(one_axis, bare(init, inpainting.gaussian_blur(mask, 8, 0)))
    assert np.abs(one_axis - blurred).mean() > 0.5


def test_gaussian_blur_is_a1111s_kernel():
    line = Image.new("L", (41, 1), 0)
    line.putpixel((20, 0), 255)
    blurred = np.asarray(inpainting.gaussian_blur(line, 4, 0), dtype=np.float64)[0]
    taps = np.exp(-(np.arange(-10, 11) ** 2) / 32.0)  # 2 * int(2.5 * 4 + 0.5) + 1 = 21 taps, std 4
    assert np.array_equal(blurred[10:31], np.rint(255 * taps / taps.sum()))
    assert blurred[:10].sum() == 0 and blurred[31:].sum() == 0
    assert np.array_equal(np.asarray(inpainting.gaussian_blur(line, 0, 4)), np.asarray(line))  # 1 px tall: mirrored


def test_invert_mask_changes_the_inpaint_and_equals_diffusers_given_the_inverted_mask(engine, bare, init, mask):
    plain = pixels(generate(engine, image=png(init), mask=png(mask)))
    inverted = pixels(generate(engine, image=png(init), mask=png(mask), invert_mask=True))
    assert np.abs(inverted - plain).mean() > 0.5
    assert np.array_equal(inverted, bare(init, ImageOps.invert(mask)))


def test_only_masked_equals_diffusers_padding_mask_crop_and_keeps_the_rest(engine, bare, init, mask):
    big_init = init.resize((96, 80))
    big_mask = Image.new("L", (96, 80), 0)
    big_mask.paste(255, (40, 24, 56, 40))
    result = generate(engine, image=png(big_init), mask=png(big_mask), padding_mask_crop=8, width=64, height=64)
    out = pixels(result)
    assert out.shape == (80, 96, 3)  # the image's own size; the crop was inpainted at 64x64
    assert np.array_equal(out, bare(big_init, big_mask, padding_mask_crop=8))
    outside = np.ones((80, 96), bool)
    outside[24 - 8:40 + 8, 40 - 8:56 + 8] = False  # the padded box (the crop region contains it)
    x1, y1, x2, y2 = inpainting._processor().get_crop_region(big_mask, 64, 64, pad=8)
    outside[y1:y2, x1:x2] = False
    assert outside.any() and np.array_equal(out[outside], as_array(big_init)[outside])
    assert np.abs(out - pixels(generate(engine, image=png(big_init), mask=png(big_mask), width=96,
                                        height=80))).mean() > 0.5


@pytest.mark.parametrize("fill", ["fill", "latent_noise", "latent_nothing"])
def test_each_fill_runs_and_differs_from_original(engine, init, mask, fill):
    original = pixels(generate(engine, image=png(init), mask=png(mask), inpaint_fill="original"))
    filled = generate(engine, image=png(init), mask=png(mask), inpaint_fill=fill)
    assert filled.images[0].width == 64
    assert np.abs(pixels(filled) - original).mean() > 0.5
    assert np.array_equal(pixels(filled), pixels(generate(engine, image=png(init), mask=png(mask), inpaint_fill=fill)))


def test_latent_fills_run_with_only_masked_and_on_sdxl(engine, init, mask):
    for model in ("tiny-sd15", "tiny-sdxl"):
        result = generate(engine, model=model, image=png(init), mask=png(mask), inpaint_fill="latent_noise",
                          padding_mask_crop=4)
        assert pixels(result).shape == (64, 64, 3)


def test_fill_paints_the_masked_area_from_its_surroundings():
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    image.paste((0, 0, 0), (8, 8, 24, 24))
    hole = Image.new("L", (32, 32), 0)
    hole.paste(255, (8, 8, 24, 24))
    filled = np.asarray(inpainting.fill_masked(image, hole), dtype=np.float32)
    assert np.abs(filled[16, 16] - [200, 40, 40]).max() < 3  # the black hole takes the red around it
    assert np.array_equal(filled[:8], np.asarray(image)[:8])


def test_overlay_keeps_the_original_outside_the_mask(engine, init, mask):
    out = pixels(generate(engine, image=png(init), mask=png(mask), inpaint_overlay=True))
    plain = pixels(generate(engine, image=png(init), mask=png(mask)))
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], as_array(init)[outside])
    assert not np.array_equal(plain[outside], as_array(init)[outside])  # bare diffusers: the VAE's round trip
    assert np.array_equal(out[~outside], plain[~outside])


@pytest.mark.parametrize(("mode", "expected"), [("resize", None), ("crop", "crop"), ("fill", "fill")])
def test_resize_modes_give_the_asked_size(engine, mode, expected):
    wide = Image.new("RGB", (128, 64), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 32, 64))  # a red left quarter
    result = generate(engine, image=png(wide), width=64, height=64, resize_mode=mode, strength=0.5)
    assert (result.images[0].width, result.images[0].height) == (64, 64)
    resized = inpainting.resize_image(wide, 64, 64, mode)
    assert resized.size == (64, 64)
    left = np.asarray(resized)[32, 2]
    # resize squeezes (red at the left edge), crop cuts the red quarter off, fill letterboxes (edge rows)
    assert (left[0] > 200) == (mode != "crop")
    if expected == "fill":
        assert np.array_equal(np.asarray(resized)[0], np.asarray(resized)[15])


def test_outpaint_grows_the_canvas_by_the_asked_pixels(engine, init):
    result = generate(engine, image=png(init), outpaint={"left": 16, "right": 8, "top": 0, "bottom": 24},
                      mask_blur=2)
    out = pixels(result)
    assert out.shape == (64 + 24, 64 + 24, 3)
    assert result.images[0].width == 88 and result.images[0].height == 88
    canvas, mask = inpainting.outpaint_canvas(init, 16, 8, 0, 24)
    assert canvas.size == mask.size == (88, 88)
    mask_values = np.asarray(mask)
    assert mask_values[:, :16].min() == 255 and mask_values[64:].min() == 255  # the new area is repainted
    assert mask_values[0:56, 16 + 8:16 + 64 - 8].max() == 0  # the inside (less the overlap) is kept
    assert np.asarray(canvas)[40, 0].sum() > 0  # the new area is pre-filled from the edge, not black


@pytest.mark.parametrize(("fields", "message"), [
    ({"outpaint": {"left": 8}}, "outpaint: needs an image"),
    ({"image": "aGk=", "mask": "aGk=", "outpaint": {"left": 8}}, "outpaint: makes its own mask"),
    ({"image": "aGk=", "outpaint": {"left": 4}}, "outpaint.left: must be a multiple of 8"),
    ({"image": "aGk=", "outpaint": {}}, "outpaint: give at least one side"),
    ({"image": "aGk=", "mask_blur": 4}, "mask_blur: needs a mask"),
    ({"image": "aGk=", "inpaint_fill": "fill"}, "inpaint_fill: needs a mask"),
    ({"image": "aGk=", "padding_mask_crop": 8}, "padding_mask_crop: needs a mask"),
    ({"resize_mode": "crop"}, "resize_mode: needs an image"),
    ({"image": "aGk=", "width": 1536, "height": 1536, "outpaint": {"left": 8}}, "outpaint: the grown canvas"),
])
def test_inconsistent_options_are_refused(fields, message):
    with pytest.raises(InvalidRequest) as error:
        parse_request(fields)
    assert message in str(error.value)


def test_outpaint_beyond_the_size_limit_is_refused_after_decoding(engine):
    big = Image.new("RGB", (2000, 64))
    with pytest.raises(InvalidRequest, match="^outpaint: the grown canvas is 2064x"):
        generate(engine, image=png(big), outpaint={"left": 64})
