"""The SDXL refiner (sd_core/refiner.py): the expert ensemble and the base-image pass equal bare diffusers; a switch
at 1.0 is no refiner; SD1.5 and refiners-as-models refused; VAE / text_encoder_2 shared with the base; progress over
both passes; cancellation inside the refiner pass; refined jobs never batch with plain ones."""

import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.errors import Cancelled, InvalidRequest
from sd_core.manifests import LocalModel, ModelManifest
from sd_core.outputs import infotext_parameters
from sd_core.schema import GenerationRequest
from sd_core.shared_modules import shared_components

PROMPT = "a lighthouse at night"
STEPS, SEED, CFG = 4, 11, 5.0
FAST = {"prompt": PROMPT, "model": "tiny-sdxl", "seed": SEED, "num_inference_steps": STEPS, "guidance_scale": CFG,
        "width": 64, "height": 64, "scheduler": "Euler"}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    """Bare diffusers (no sd_core): the tiny SDXL base and the tiny refiner built on its VAE and text_encoder_2, as
    diffusers documents the ensemble of experts, with Euler on each model's own scheduler config."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_bucket / "tiny-sdxl" / "diffusers", local_files_only=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_bucket / "tiny-sdxl-refiner" / "diffusers", text_encoder_2=base.text_encoder_2, vae=base.vae,
        local_files_only=True)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")

    def run(refine: str, frac: float = 0.8, lora: str | None = None, steps: int = STEPS) -> np.ndarray:
        common = {"prompt": PROMPT, "num_inference_steps": steps, "guidance_scale": CFG}
        if lora:  # on the base pass only: off again before the refiner, which shares text_encoder_2
            base.load_lora_weights(tiny_bucket / "loras" / lora, adapter_name="style")
        with torch.inference_mode():
            first = {"denoising_end": frac} if refine == "expert_ensemble_refiner" else {}
            latents = base(**common, **first, width=64, height=64, output_type="latent",
                           generator=torch.Generator("cpu").manual_seed(SEED)).images
        if lora:
            base.unload_lora_weights()
        with torch.inference_mode():
            second = {"denoising_start": frac} if refine == "expert_ensemble_refiner" else {}  # else strength 0.3
            image = refiner(**common, **second, image=latents,
                            generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
        return np.asarray(image.convert("RGB"), dtype=np.float32)

    return run


@pytest.fixture(scope="module")
def plain(engine):
    return engine.generate(GenerationRequest(**FAST))


def test_expert_ensemble_equals_bare_diffusers_and_changes_the_image(engine, bare, plain):
    steps = []
    refined = engine.generate(GenerationRequest(**FAST, refine="expert_ensemble_refiner", high_noise_frac=0.5),
                              on_step=lambda done, total: steps.append((done, total)))
    assert np.array_equal(pixels(refined), bare("expert_ensemble_refiner", 0.5))
    assert np.abs(pixels(refined) - pixels(plain)).mean() > 0.5  # the refiner changed the image
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 base steps, then 2 refiner steps, of 4 in all
    fields = infotext_parameters(refined.parameters)
    assert (fields["Refiner"], fields["Refiner switch at"]) == ("tiny-sdxl-refiner", "0.5")
    assert refined.request.refiner == "tiny-sdxl-refiner"  # the manifest's `refiner:`, reported as used
    assert refined.timings["refine_s"] > 0
    # the same through A1111's keys: the refiner named as sd-models lists it, switching at half the steps
    from_a1111 = engine.generate(a1111.to_request(a1111.parse_call({
        "prompt": PROMPT, "seed": SEED, "steps": STEPS, "cfg_scale": CFG, "width": 64, "height": 64,
        "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-sdxl"},
        "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5})))
    assert np.array_equal(pixels(from_a1111), pixels(refined))


def test_switch_at_one_is_no_refiner(engine, plain):
    native = engine.generate(GenerationRequest(**FAST, refine="expert_ensemble_refiner", high_noise_frac=1.0))
    assert np.array_equal(pixels(native), pixels(plain))
    assert "Refiner" not in infotext_parameters(native.parameters)  # as A1111: written only when the refiner ran
    request = a1111.to_request(a1111.parse_call({"steps": 4, "refiner_checkpoint": "tiny-sdxl-refiner [0123abcd]",
                                                 "refiner_switch_at": 1}))
    assert (request.refine, request.refiner, request.high_noise_frac) == ("expert_ensemble_refiner",
                                                                          "tiny-sdxl-refiner", 1.0)


def test_base_image_refiner_equals_bare_diffusers(engine, bare):
    # 10 steps: strength 0.3 refines the last 3 (at 4, A1111's schedule leaves it one step at sigma_min, ~invisible)
    fields = {**FAST, "num_inference_steps": 10}
    refined = engine.generate(GenerationRequest(**fields, refine="base_image_refiner"))
    assert np.array_equal(pixels(refined), bare("base_image_refiner", steps=10))
    assert np.abs(pixels(refined) - pixels(engine.generate(GenerationRequest(**fields)))).mean() > 0.1
    assert infotext_parameters(refined.parameters)["Refiner steps"] == "10"


def test_base_loras_apply_to_the_base_pass_only(engine, bare):
    refined = engine.generate(GenerationRequest(**FAST, refine="expert_ensemble_refiner", high_noise_frac=0.5,
                                                loras=[{"source": "tiny-xl-style"}]))
    assert np.array_equal(pixels(refined), bare("expert_ensemble_refiner", 0.5, lora="tiny-sdxl-peft.safetensors"))
    assert np.abs(pixels(refined) - bare("expert_ensemble_refiner", 0.5)).mean() > 0.5  # the LoRA did something


def test_refiner_modules_are_the_base_modules(engine, plain, tiny_bucket):
    engine.generate(GenerationRequest(**{**FAST, "num_inference_steps": 2}, refine="expert_ensemble_refiner"))
    base = engine.pool.get("tiny-sdxl").pipeline("txt2img")
    refiner = engine.pool.get("tiny-sdxl-refiner").pipeline("txt2img")
    assert refiner.vae is base.vae and refiner.text_encoder_2 is base.text_encoder_2
    assert refiner.unet is not base.unet and refiner.text_encoder is None
    loaded = {name: engine.pool.get(name) for name in engine.pool.loaded}
    shared = sum(t.numel() * t.element_size()
                 for module in (base.vae, base.text_encoder_2) for t in (*module.parameters(), *module.buffers()))
    assert engine.pool.used_bytes == sum(m.nbytes for m in loaded.values()) - shared  # counted once in the budget
    # a refiner whose VAE and encoder files differ from the base's gets its own
    own = ModelManifest(name="own", architecture="sdxl-refiner", format="diffusers", uri="x/")
    local = LocalModel(manifest=own, weights=tiny_bucket / "tiny-sdxl-refiner-own" / "diffusers", config=None)
    assert shared_components(local, engine.pool.get("tiny-sdxl")) == {}


@pytest.mark.parametrize(("request_fields", "message"), [
    ({"model": "tiny-sd15", "refine": "expert_ensemble_refiner", "refiner": "tiny-sdxl-refiner"},
     "refiner: 'tiny-sdxl-refiner' refines sdxl models, not 'tiny-sd15' (sd15)"),
    ({"model": "tiny-sdxl", "refine": "base_image_refiner", "refiner": "tiny-sd15"},
     "refiner: 'tiny-sd15' is no refiner (architecture sd15)"),
    ({"model": "tiny-sdxl", "refine": "base_image_refiner", "refiner": "nope"}, "refiner: unknown model 'nope'"),
    ({"model": "tiny-sdxl-single", "refine": "expert_ensemble_refiner"},
     "refiner: refine needs a refiner model: name one, or give the manifest of 'tiny-sdxl-single' a `refiner:`"),
    ({"model": "tiny-sdxl-refiner"}, "model: 'tiny-sdxl-refiner' is a refiner: use it as `refiner`"),
    ({"model": "tiny-sdxl", "refine": "base_image_refiner", "refine_steps": 3},
     "refine_steps: base_image_refiner runs 0.3 of its steps (img2img strength): give at least 4 (got 3)"),
])
def test_refused_refiner_requests(engine, request_fields, message):
    with pytest.raises(InvalidRequest) as caught:
        engine.prepare(GenerationRequest(prompt="x", **request_fields))
    assert str(caught.value).startswith(message), str(caught.value)


def test_refined_jobs_never_batch_with_plain_ones(engine):
    plain_job = engine.prepare(GenerationRequest(**FAST))
    refined = engine.prepare(GenerationRequest(**FAST, refine="expert_ensemble_refiner"))
    other = engine.prepare(GenerationRequest(**FAST, refine="base_image_refiner"))
    assert len({plain_job.batch_key, refined.batch_key, other.batch_key}) == 3


def test_cancel_inside_the_refiner_pass(engine):
    steps = []
    with pytest.raises(Cancelled):
        engine.generate(GenerationRequest(**FAST, refine="expert_ensemble_refiner", high_noise_frac=0.5),
                        on_step=lambda done, total: steps.append(done),
                        should_cancel=lambda: bool(steps) and steps[-1] > 2)  # after the refiner's first step
    assert steps == [1, 2, 3]
