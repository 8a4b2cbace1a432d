"""Alternate VAEs (`vae`, A1111's override_settings.sd_vae): swapped in for one call, equal to bare diffusers built with
that VAE (txt2img, img2img, inpaint), the model's own back after it (also after a failure), never mixed in a batch."""

import dataclasses
import functools
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.errors import Cancelled, InvalidRequest
from sd_core.manifests import ModelManifest
from sd_core.schema import GenerationRequest
from tests.fixtures import a1111_infotext

PROMPT = "a red fox in the snow"
FAST = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64, "height": 64,
        "scheduler": "Euler"}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def init_images() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8))
    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return image, Image.fromarray(mask)


def b64(image: Image.Image) -> str:
    import base64

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@functools.cache
def bare_image(tiny_bucket, mode: str = "txt2img", vae: bool = True) -> np.ndarray:
    """The same SD1.5 generation through bare diffusers, built with `vae=AutoencoderKL.from_pretrained(alt)`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    cls = {"txt2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
           "inpaint": StableDiffusionInpaintPipeline}[mode]
    extra = {"vae": AutoencoderKL.from_pretrained(tiny_bucket / "vaes" / "tiny-sd15-vae")} if vae else {}
    pipe = cls.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    kwargs = {"width": 64, "height": 64}
    image, mask = init_images()
    if mode != "txt2img":
        kwargs = {"image": image, "strength": 0.6}
    if mode == "inpaint":
        kwargs.update(mask_image=mask, width=64, height=64)
    with torch.inference_mode():
        result = pipe(prompt=PROMPT, num_inference_steps=2, guidance_scale=7.0, output_type="pil",
                      generator=torch.Generator("cpu").manual_seed(3), **kwargs).images[0]
    return np.asarray(result.convert("RGB"), dtype=np.float32)


def own_vae_in_place(engine, model: str = "tiny-sd15") -> bool:
    loaded = engine.pool.get(model)
    return all(pipe.vae is loaded.own_vae for pipe in loaded.pipes.values())


def test_vae_swaps_the_image_and_equals_bare_diffusers_with_that_vae(engine, tiny_bucket):
    expected, own = bare_image(tiny_bucket), bare_image(tiny_bucket, vae=False)
    single = engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="tiny-vae"))
    folder = engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="tiny-vae-folder"))
    checkpoint = engine.generate(GenerationRequest(**FAST, model="tiny-sd15-single", vae="tiny-vae"))
    assert np.array_equal(pixels(single), expected)
    assert np.array_equal(pixels(folder), expected)
    assert np.array_equal(pixels(checkpoint), expected)  # the single-file model loads it with its own VAE config
    assert np.abs(expected - own).mean() > 5  # another VAE, another image
    assert own_vae_in_place(engine) and own_vae_in_place(engine, "tiny-sd15-single")
    # infotext: "Model: ..., VAE hash: <10 hex>, VAE: <name>" as A1111 writes it (a folder has no file to hash)
    digest = hashlib.sha256((tiny_bucket / "vaes" / "tiny-sd15-vae.safetensors").read_bytes()).hexdigest()
    assert f"Model: tiny-sd15, VAE hash: {digest[:10]}, VAE: tiny-vae, " in single.parameters
    parsed = a1111_infotext.parse(single.parameters)
    assert (parsed["VAE"], parsed["VAE hash"]) == ("tiny-vae", digest[:10])
    assert "VAE hash" not in folder.parameters and "VAE: tiny-vae-folder" in folder.parameters
    assert single.request.vae == "tiny-vae"


def test_automatic_none_and_absent_are_the_models_own_vae_also_after_a_swap(engine, tiny_bucket):
    own = bare_image(tiny_bucket, vae=False)
    engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="tiny-vae"))
    for value in (None, "Automatic", "None", "automatic"):
        result = engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae=value))
        assert np.array_equal(pixels(result), own), value
        assert "VAE" not in result.parameters and result.request.vae is None


def test_a_failed_request_leaves_the_models_own_vae(engine, tiny_bucket):
    own = bare_image(tiny_bucket, vae=False)
    with pytest.raises(Cancelled):  # cancelled inside the pipeline call, with the alternate VAE swapped in
        engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="tiny-vae"), should_cancel=lambda: True)
    assert own_vae_in_place(engine)
    assert np.array_equal(pixels(engine.generate(GenerationRequest(**FAST, model="tiny-sd15"))), own)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_encode_and_decode_with_the_chosen_vae(engine, tiny_bucket, mode):
    image, mask = init_images()
    fields = {**FAST, "model": "tiny-sd15", "image": b64(image), "strength": 0.6, "vae": "tiny-vae"}
    if mode == "inpaint":
        fields["mask"] = b64(mask)
    result = engine.generate(GenerationRequest(**fields))
    assert np.array_equal(pixels(result), bare_image(tiny_bucket, mode))  # encoding with the own VAE would differ
    assert own_vae_in_place(engine)


def test_concurrent_requests_with_different_vaes_each_get_their_own(engine_settings, engine):
    from sd_core.engine import Engine
    from tests.sd_core.test_batching import run_concurrently

    batching = Engine(dataclasses.replace(engine_settings, max_batch_images=8, batch_wait_ms=300))
    vaes = ["tiny-vae", None, "tiny-vae", None]
    requests = [GenerationRequest(**{**FAST, "seed": 20 + i}, model="tiny-sd15", vae=vae) for i, vae in enumerate(vaes)]
    results = run_concurrently(batching, requests)
    assert all(not isinstance(r, Exception) for r in results), results
    assert max(r.timings["batch_size"] for r in results) <= 2  # never two VAEs in one call
    for request, result in zip(requests, results, strict=True):
        alone = engine.generate(request)
        other = engine.generate(request.model_copy(update={"vae": None if request.vae else "tiny-vae"}))
        assert np.abs(pixels(result) - pixels(alone)).max() <= 2  # batched: a level or two at most (docs/api.md)
        assert np.abs(pixels(result) - pixels(other)).mean() > 5
    assert own_vae_in_place(batching)


def test_unknown_vae_is_refused_naming_the_valid_ones(engine):
    with pytest.raises(InvalidRequest) as caught:
        engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="no-such-vae"))
    message = str(caught.value)
    assert message == ("vae: unknown VAE 'no-such-vae' for tiny-sd15; available: tiny-vae, tiny-vae-folder (or "
                       "Automatic / None: the model's own)")
    assert a1111.rename_fields(message).startswith("override_settings.sd_vae: unknown VAE 'no-such-vae'")


def test_a1111_sd_vae_takes_the_name_with_or_without_extension(engine):
    def request(sd_vae):
        return a1111.to_request(a1111.parse_call({
            "prompt": PROMPT, "seed": 3, "steps": 2, "cfg_scale": 7.0, "width": 64, "height": 64,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-sd15", "sd_vae": sd_vae}}))

    assert request("tiny-vae").vae == "tiny-vae"
    assert request("Automatic").vae is None and request("None").vae is None
    native = engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="tiny-vae"))
    assert np.array_equal(pixels(engine.generate(request("tiny-vae.safetensors"))), pixels(native))
    with pytest.raises(InvalidRequest, match=r"^override_settings.sd_vae: expected a VAE name"):
        request(3)


def test_loaded_vaes_count_in_the_models_memory_and_stay_few(make_engine):
    engine = make_engine(vae_max_loaded=1)
    engine.generate(GenerationRequest(**FAST, model="tiny-sd15"))
    model = engine.pool.get("tiny-sd15")
    bare = model.nbytes
    engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="tiny-vae"))
    assert model.nbytes > bare and len(model.vaes) == 1
    engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="tiny-vae-folder"))
    assert len(model.vaes) == 1 and next(iter(model.vaes))[0] == "tiny-vae-folder"  # least recently used out


@pytest.mark.parametrize(("vae", "message"), [
    ({"name": "Automatic", "uri": "v.safetensors"}, "means the model's own VAE in requests"),
    ({"name": "v", "uri": "v/", "sha256": "0" * 64}, "a VAE folder pins per-file checksums under `files`"),
])
def test_manifest_vae_entries_are_checked(vae, message):
    with pytest.raises(ValueError, match=message):
        ModelManifest(name="m", architecture="sd15", format="diffusers", uri="m/", vaes=[vae])


def test_a_vae_file_that_does_not_load_fails_clearly_and_changes_nothing(engine_settings, tiny_bucket):
    from sd_core.engine import Engine
    from sd_core.errors import ManifestError
    from sd_core.manifests import ModelCatalog, VaeEntry, load_manifest
    from sd_core.settings import REPO_ROOT

    manifest = load_manifest(REPO_ROOT / "models" / "tiny-sd15.yaml")
    broken = VaeEntry(name="broken", uri="loras/tiny-sd15-peft.safetensors")  # a LoRA file, not a VAE
    engine = Engine(engine_settings, ModelCatalog({"tiny-sd15": manifest.model_copy(update={"vaes": [broken]})}))
    with pytest.raises(ManifestError) as caught:
        engine.generate(GenerationRequest(**FAST, model="tiny-sd15", vae="broken"))
    assert str(caught.value).startswith("vae: VAE broken cannot be loaded for tiny-sd15 (")
    assert own_vae_in_place(engine)
    plain = engine.generate(GenerationRequest(**FAST, model="tiny-sd15"))
    assert np.array_equal(pixels(plain), bare_image(tiny_bucket, vae=False))
