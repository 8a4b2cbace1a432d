"""The sd_core engine on tiny random-weight models: every mode, architecture, format and parameter."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sd_core.errors import InvalidRequest, ModelNotFound
from sd_core.outputs import read_parameters
from sd_core.schedulers import SCHEDULER_NAMES
from sd_core.schema import GenerationRequest
from tests.fixtures import a1111_infotext as a1111


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    return engine.generate(GenerationRequest(**{"prompt": "a red fox in the snow", "seed": 1, **fields}))


def as_base64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def init_image() -> str:
    rng = np.random.default_rng(0)
    return as_base64_png(rng.integers(0, 255, (64, 64, 3)))


@pytest.fixture(scope="module")
def mask_image() -> str:
    mask = np.zeros((64, 64, 3))
    mask[16:48, 16:48] = 255
    return as_base64_png(mask)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_txt2img_png_with_parameters(engine, model):
    result = generate(engine, model=model, seed=1234)
    assert result.model == model and result.seeds == [1234]
    image = Image.open(io.BytesIO(result.images[0].data))
    assert image.format == "PNG" and image.size == (64, 64)
    text = read_parameters(result.images[0].data)
    assert text.startswith("a red fox in the snow\n") and "Seed: 1234" in text and f"Model: {model}" in text
    assert pixels(result).std() > 1.0, "image is flat"
    assert set(result.timings) >= {"load_s", "inference_s", "encode_s", "total_s"}


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_same_seed_same_image_other_seed_differs(engine, model):
    first, again, other = (generate(engine, model=model, seed=s) for s in (5, 5, 6))
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


def test_random_seed_is_reported_and_reproducible(engine):
    result = generate(engine, seed=None)
    assert 0 <= result.seed < 2**32
    assert np.array_equal(pixels(result), pixels(generate(engine, seed=result.seed)))
    assert generate(engine, seed=-1).seed != result.seed


def test_num_outputs_gives_consecutive_seeds_each_reproducible(engine):
    batch = generate(engine, seed=100, num_outputs=3)
    assert batch.seeds == [100, 101, 102] and len(batch.images) == 3
    alone = generate(engine, seed=101)
    assert np.abs(pixels(batch, 1) - pixels(alone)).max() <= 2  # batched vs single: float noise only


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_size(engine, model):
    result = generate(engine, model=model, width=96, height=64)
    assert (result.images[0].width, result.images[0].height) == (96, 64)
    assert Image.open(io.BytesIO(result.images[0].data)).size == (96, 64)


@pytest.mark.parametrize("field,value", [("guidance_scale", 1.0), ("negative_prompt", "blurry"),
                                         ("prompt", "a blue whale"), ("num_inference_steps", 2)])
def test_each_parameter_changes_the_image(engine, field, value):
    base = generate(engine)
    changed = generate(engine, **{field: value})
    assert np.abs(pixels(base) - pixels(changed)).mean() > 0.5, field


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_generates(engine, name):
    result = generate(engine, scheduler=name, num_inference_steps=3)
    written = a1111.parse(result.parameters)  # A1111 writes "DPM++ 2M Karras" as sampler + schedule type
    sampler, schedule = written["Sampler"], written["Schedule type"]
    assert (sampler if schedule in ("Automatic", "Uniform") else f"{sampler} {schedule}") == name
    assert np.isfinite(pixels(result)).all() and pixels(result).std() > 1.0


def test_schedulers_differ_and_are_built_once(engine):
    euler = generate(engine, scheduler="Euler")
    dpm = generate(engine, scheduler="DPM++ 2M Karras")
    assert np.abs(pixels(euler) - pixels(dpm)).mean() > 0.5
    model = engine.pool.get("tiny-sd15")
    built = model.scheduler("DPM++ 2M Karras")
    generate(engine, scheduler="DPM++ 2M Karras")
    assert model.scheduler("DPM++ 2M Karras") is built
    assert built.config.use_karras_sigmas is True


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_img2img_strength(engine, init_image, model):
    weak = generate(engine, model=model, image=init_image, strength=0.3)
    strong = generate(engine, model=model, image=init_image, strength=0.9)
    assert weak.images[0].width == 64 and "Denoising strength: 0.3" in weak.parameters
    assert np.abs(pixels(weak) - pixels(strong)).mean() > 0.5


def test_img2img_takes_the_init_image_size_and_resizes_to_request(engine):
    wide = as_base64_png(np.random.default_rng(1).integers(0, 255, (64, 128, 3)))
    assert generate(engine, image=wide).images[0].width == 128
    resized = generate(engine, image=wide, width=64, height=64)
    assert (resized.images[0].width, resized.images[0].height) == (64, 64)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_inpaint(engine, init_image, mask_image, model):
    inpainted = generate(engine, model=model, image=init_image, mask=mask_image, strength=1.0)
    img2img = generate(engine, model=model, image=init_image, strength=1.0)
    assert inpainted.images[0].width == 64
    assert np.abs(pixels(inpainted) - pixels(img2img)).mean() > 0.5


def test_img2img_shares_weights_with_txt2img(engine, init_image):
    generate(engine, image=init_image)
    model = engine.pool.get("tiny-sd15")
    assert model.pipeline("img2img").unet is model.pipeline("txt2img").unet


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_checkpoint_matches_diffusers_folder(engine, arch):
    folder = generate(engine, model=f"tiny-{arch}", seed=9)
    single = generate(engine, model=f"tiny-{arch}-single", seed=9)
    assert np.abs(pixels(folder) - pixels(single)).max() <= 2


@pytest.mark.parametrize("fmt,mime", [("png", "image/png"), ("webp", "image/webp"), ("jpeg", "image/jpeg")])
def test_output_formats_carry_parameters(engine, fmt, mime):
    result = generate(engine, output_format=fmt, seed=77)
    image = result.images[0]
    assert image.mime_type == mime
    assert Image.open(io.BytesIO(image.data)).format == {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]
    assert "Seed: 77" in read_parameters(image.data)


def test_output_quality_changes_jpeg_size(engine):
    low = generate(engine, output_format="jpeg", output_quality=10, width=128, height=128)
    high = generate(engine, output_format="jpeg", output_quality=95, width=128, height=128)
    assert len(low.images[0].data) < len(high.images[0].data)


def test_progress_callback_counts_steps(engine):
    seen = []
    request = GenerationRequest(num_inference_steps=3, seed=1)
    engine.generate(request, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_cancel_between_steps(engine):
    from sd_core.errors import Cancelled

    with pytest.raises(Cancelled):
        engine.generate(GenerationRequest(seed=1), should_cancel=lambda: True)
    assert generate(engine).images  # the engine still serves


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"model": "nope"}, "model"),
        ({"image": "not base64!!"}, "image"),
        ({"image": base64.b64encode(b"garbage bytes").decode()}, "image"),
        ({"image": ""}, "image"),
        ({"num_outputs": 8, "width": 1024, "height": 1024}, "num_outputs"),
    ],
)
def test_invalid_requests_name_the_field(engine, fields, field):
    with pytest.raises(InvalidRequest) as info:
        generate(engine, **fields)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_unknown_model_lists_available(engine):
    with pytest.raises(ModelNotFound, match="tiny-sd15"):
        generate(engine, model="sd-turbo")


def test_truncated_png_is_refused(engine, init_image):
    data = base64.b64decode(init_image)[:200]
    with pytest.raises(InvalidRequest, match="^image: "):
        generate(engine, image=base64.b64encode(data).decode())


def test_mask_of_wrong_size_is_refused(engine, init_image):
    small = as_base64_png(np.zeros((32, 32, 3)))
    with pytest.raises(InvalidRequest, match="^mask: mask is 32x32 but image is 64x64"):
        generate(engine, image=init_image, mask=small)


def test_a_strength_too_low_for_one_step_is_refused_clearly(engine):
    """img2img runs int(steps x strength) steps: below one, diffusers fails deep inside; refused up front."""
    import base64
    import io

    from PIL import Image

    from sd_core.errors import InvalidRequest
    from sd_core.schema import GenerationRequest

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "gray").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(InvalidRequest) as caught:
        engine.generate(GenerationRequest(prompt="a fox", image=image, strength=0.05, num_inference_steps=3))
    assert str(caught.value).startswith("strength: 0.05 x 3 steps leaves no denoising step to run"), str(caught.value)
    assert engine.generate(GenerationRequest(prompt="a fox", image=image, strength=0.34, num_inference_steps=3)).images
