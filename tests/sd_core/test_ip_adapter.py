"""IP-Adapter image prompts (`ip_adapters`, A1111's ControlNet ip-adapter units): equal to bare diffusers'
load_ip_adapter from the same files, scale 0 and later plain requests exactly the plain image, SDXL, img2img,
refusals (unknown adapter, FaceID, two adapters, A1111 keys that would change the image)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest

FAST = {"prompt": "a cat", "seed": 5, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64, "height": 64,
        "scheduler": "Euler", "model": "tiny-sd15"}
SCALE = 0.8


def reference_image() -> Image.Image:
    """A striped 64x64 reference image (what the adapter should see)."""
    grid = np.indices((64, 64)).sum(0)
    return Image.fromarray(np.stack([grid * 4 % 256, grid * 2 % 256, 255 - grid * 3 % 256], -1).astype("uint8"))


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


REF = data_uri(reference_image())


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def bare_pipeline(tiny_bucket, arch: str, scale: float | None):
    """Bare diffusers from the same local files: from_pretrained + load_ip_adapter (diffusers loads the encoder)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(tiny_bucket / f"tiny-{arch}" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    if scale is not None:
        pipe.load_ip_adapter(str(tiny_bucket / "ip-adapters"), subfolder="",
                             weight_name=f"tiny-ip-adapter-{arch}.safetensors", image_encoder_folder="image_encoder",
                             local_files_only=True)
        pipe.set_ip_adapter_scale(scale)
    return pipe


def bare_call(pipe, **kwargs) -> np.ndarray:
    import torch

    with torch.inference_mode():
        image = pipe("a cat", num_inference_steps=kwargs.pop("steps", 2), guidance_scale=kwargs.pop("cfg", 7.0),
                     generator=torch.Generator("cpu").manual_seed(5), **kwargs).images[0]
    return as_array(image)


@pytest.fixture(scope="module")
def fresh_engine(engine_settings):
    """An engine of its own: its first plain image is a never-loaded model's."""
    from sd_core.engine import Engine

    return Engine(engine_settings)


@pytest.fixture(scope="module")
def sd15_runs(fresh_engine):
    engine = fresh_engine
    never = pixels(engine.generate(GenerationRequest(**FAST)))
    adapted = engine.generate(GenerationRequest(**FAST, ip_adapters=[{"image": REF, "scale": SCALE}]))
    zero = pixels(engine.generate(GenerationRequest(**FAST, ip_adapters=[{"image": REF, "scale": 0}])))
    after = pixels(engine.generate(GenerationRequest(**FAST)))
    return {"never": never, "adapted": pixels(adapted), "zero": zero, "after": after, "result": adapted}


def test_the_adapter_changes_the_image_and_equals_bare_diffusers(sd15_runs, tiny_bucket):
    assert np.abs(sd15_runs["adapted"] - sd15_runs["never"]).mean() > 1.0
    pipe = bare_pipeline(tiny_bucket, "sd15", SCALE)
    reference = bare_call(pipe, width=64, height=64, ip_adapter_image=reference_image())
    assert np.array_equal(sd15_runs["adapted"], reference)


def test_scale_zero_and_a_later_plain_request_are_the_never_loaded_image(sd15_runs, tiny_bucket):
    assert np.array_equal(sd15_runs["zero"], sd15_runs["never"])
    assert np.array_equal(sd15_runs["after"], sd15_runs["never"])
    assert np.array_equal(sd15_runs["never"], bare_call(bare_pipeline(tiny_bucket, "sd15", None), width=64, height=64))


def test_adapter_jobs_never_batch_and_the_effective_request_keeps_the_entry(sd15_runs, fresh_engine):
    assert sd15_runs["result"].request.ip_adapters[0].scale == SCALE
    assert sd15_runs["result"].timings["ip_adapter_s"] > 0
    job = fresh_engine.prepare(GenerationRequest(**FAST, ip_adapters=[{"image": REF}]))
    assert job.ip_adapter is not None and job.ip_adapter.label == "tiny-ip-adapter" and job.batch_key is None
    assert fresh_engine.prepare(GenerationRequest(**FAST)).batch_key is not None


def test_several_images_for_one_adapter(fresh_engine):
    flipped = data_uri(reference_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    one = pixels(fresh_engine.generate(GenerationRequest(**FAST, ip_adapters=[{"image": REF, "scale": SCALE}])))
    two = pixels(fresh_engine.generate(GenerationRequest(**FAST, ip_adapters=[
        {"image": REF, "scale": SCALE}, {"image": flipped, "scale": SCALE}])))
    assert not np.array_equal(one, two)


def test_sdxl_equals_bare_diffusers(fresh_engine, tiny_bucket):
    request = GenerationRequest(**{**FAST, "model": "tiny-sdxl", "guidance_scale": 5.0},
                                ip_adapters=[{"model": "tiny-xl-ip-adapter", "image": REF, "scale": SCALE}])
    got = pixels(fresh_engine.generate(request))
    pipe = bare_pipeline(tiny_bucket, "sdxl", SCALE)
    assert np.array_equal(got, bare_call(pipe, cfg=5.0, width=64, height=64, ip_adapter_image=reference_image()))
    pipe.unload_ip_adapter()
    assert np.abs(got - bare_call(pipe, cfg=5.0, width=64, height=64)).mean() > 1.0


def test_img2img_with_an_adapter_equals_bare_diffusers(fresh_engine, tiny_bucket):
    from diffusers import StableDiffusionImg2ImgPipeline

    init = Image.fromarray(np.full((64, 64, 3), (200, 90, 30), dtype=np.uint8))
    base = {**FAST, "num_inference_steps": 4, "image": data_uri(init), "strength": 0.75}
    got = pixels(fresh_engine.generate(GenerationRequest(**base, ip_adapters=[{"image": REF, "scale": SCALE}])))
    plain = pixels(fresh_engine.generate(GenerationRequest(**base)))
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(bare_pipeline(tiny_bucket, "sd15", SCALE))
    assert np.array_equal(got, bare_call(pipe, steps=4, image=init, strength=0.75, ip_adapter_image=reference_image()))
    assert np.abs(got - plain).mean() > 1.0


# --- refusals (no GPU work: stage 4 refuses) -------------------------------------------------------------------------
def test_unknown_adapter_is_refused_listing_the_valid_ones(fresh_engine):
    with pytest.raises(InvalidRequest) as error:
        fresh_engine.prepare(GenerationRequest(**FAST, ip_adapters=[{"model": "nope", "image": REF}]))
    assert str(error.value) == ("ip_adapters[0].model: unknown IP-Adapter 'nope' for model 'tiny-sd15'; "
                                "available: tiny-ip-adapter")
    with pytest.raises(InvalidRequest, match="unknown IP-Adapter 'tiny-xl-ip-adapter'"):  # another architecture's
        fresh_engine.prepare(GenerationRequest(**FAST, ip_adapters=[{"model": "tiny-xl-ip-adapter", "image": REF}]))


def test_face_id_is_refused(fresh_engine):
    with pytest.raises(InvalidRequest, match="insightface"):
        fresh_engine.prepare(GenerationRequest(**FAST, ip_adapters=[{"model": "ip-adapter-faceid_sd15", "image": REF}]))


def test_two_adapters_or_two_scales_are_refused(engine_settings):
    from sd_core.engine import Engine
    from sd_core.manifests import ModelCatalog

    catalog = ModelCatalog.from_dir(engine_settings.models_dir)
    manifest = catalog.get("tiny-sd15")
    manifest.ip_adapters.append(manifest.ip_adapters[0].model_copy(update={"name": "tiny-ip-adapter-2"}))
    engine = Engine(engine_settings, catalog)
    with pytest.raises(InvalidRequest, match="one IP-Adapter model per request, got tiny-ip-adapter, tiny-ip-ad"):
        engine.prepare(GenerationRequest(**FAST, ip_adapters=[{"image": REF}, {"model": "tiny-ip-adapter-2",
                                                                               "image": REF}]))
    with pytest.raises(InvalidRequest, match="share one scale"):
        engine.prepare(GenerationRequest(**FAST, ip_adapters=[{"image": REF, "scale": 0.5}, {"image": REF}]))


def test_an_adapter_that_does_not_fit_the_model_is_refused_and_leaves_it_plain(engine_settings, sd15_runs):
    """A manifest entry pointing an SD1.5 model at an SDXL adapter file: the load fails half-way (shapes), the
    request is refused naming the adapter, and the next plain request is the never-loaded image."""
    from sd_core.engine import Engine
    from sd_core.manifests import ModelCatalog

    catalog = ModelCatalog.from_dir(engine_settings.models_dir)
    manifest = catalog.get("tiny-sd15")
    manifest.ip_adapters[0] = manifest.ip_adapters[0].model_copy(
        update={"uri": "ip-adapters/tiny-ip-adapter-sdxl.safetensors"})
    engine = Engine(engine_settings, catalog)
    with pytest.raises(InvalidRequest, match=r"^ip_adapters: IP-Adapter tiny-ip-adapter does not fit model 'tiny-sd"):
        engine.generate(GenerationRequest(**FAST, ip_adapters=[{"image": REF}]))
    assert np.array_equal(pixels(engine.generate(GenerationRequest(**FAST))), sd15_runs["never"])


def test_a_bad_reference_image_is_refused_naming_it(fresh_engine):
    with pytest.raises(InvalidRequest, match=r"^ip_adapters\[0\]\.image: not valid base64"):
        fresh_engine.prepare(GenerationRequest(**FAST, ip_adapters=[{"image": "!!!"}]))


# --- A1111: the ControlNet extension's IP-Adapter units ------------------------------------------------------------
def unit(**changes) -> dict:
    return {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "tiny-ip-adapter [6a3f6166]", "weight": 0.6,
            "image": REF, "resize_mode": "Crop and Resize", "processor_res": 512, "pixel_perfect": False,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced", **changes}


def translate(*units) -> GenerationRequest:
    payload = {"prompt": "a cat", "steps": 2, "alwayson_scripts": {"controlnet": {"args": list(units)}}}
    return a1111.to_request(a1111.parse_call(payload))


def test_a1111_ip_adapter_unit_becomes_an_ip_adapters_entry():
    request = translate(unit(), unit(enabled=False, module="canny"), {"enabled": False})
    assert [spec.model_dump() for spec in request.ip_adapters] == [
        {"model": "tiny-ip-adapter", "image": REF, "scale": 0.6}]
    assert translate(unit(model="tiny-ip-adapter.safetensors", image={"image": REF, "mask": None})).ip_adapters[0] \
        .model == "tiny-ip-adapter"
    assert translate(unit(enabled=False)).ip_adapters == []


@pytest.mark.parametrize(("changes", "message"), [
    ({"module": "ip-adapter_face_id_plus"}, "alwayson_scripts.controlnet.args[0].module: 'ip-adapter_face_id_plus': "
                                            "FaceID IP-Adapters need face embeddings from insightface"),
    ({"guidance_end": 0.5}, "alwayson_scripts.controlnet.args[0].guidance_end: only the extension's default (1)"),
    ({"control_mode": "My prompt is more important"}, "args[0].control_mode: only the extension's default"),
    ({"image": None}, "args[0].image: an IP-Adapter unit needs its reference image"),
    ({"weight": 9}, "alwayson_scripts.controlnet.args[0].weight: Input should be less than or equal to 2"),
    ({"surprise": 1}, "args[0].surprise: unknown ControlNet unit key"),
])
def test_a1111_ip_adapter_unit_refusals(changes, message):
    with pytest.raises(InvalidRequest) as error:
        translate(unit(**changes))
    assert message in str(error.value)


def test_a1111_controlnet_and_ip_adapter_units_of_one_entry_split():
    """One `controlnet` entry: its IP-Adapter units become `ip_adapters`, its other units ControlNet units."""
    request = translate(unit(), {"module": "canny", "model": "control_canny [d14c016b]", "image": REF})
    assert [spec.model for spec in request.ip_adapters] == ["tiny-ip-adapter"]
    assert [(u.model, u.preprocessor) for u in request.controlnets] == [("control_canny", "canny")]
    with pytest.raises(InvalidRequest, match="alwayson_scripts.controlnet.args.1.module"):  # still refused by name
        translate(unit(), {"module": "depth_midas", "model": "control_depth", "image": REF})
