"""SD3 family (sd_core/families/sd3.py) on the tiny SD3 model: same pixels as bare diffusers, T5-less manifest,
max_sequence_length, flow-matching scheduler, refusals, LoRA, single-file detection, A1111 payload."""

import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111, families
from sd_core.checkpoints import checkpoint_keys
from sd_core.errors import InvalidRequest
from sd_core.manifests import ModelManifest
from sd_core.schema import GenerationRequest
from tests.fixtures.images import box_mask, noise_image
from tests.fixtures.images import png_b64 as png

PROMPT = "a red fox in the snow"
SETTINGS = {"model": "tiny-sd3", "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 7}


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    return engine.generate(GenerationRequest(**{"prompt": PROMPT, **SETTINGS, **fields}))


@pytest.fixture(scope="module")
def init() -> Image.Image:
    return noise_image()


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    return box_mask((16, 16, 48, 40))


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    """Plain diffusers: the tiny SD3 pipelines, called as the docs show, one CPU generator per image."""
    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

    folder = tiny_bucket / "tiny-sd3" / "diffusers"
    pipes = {}

    def run(mode="txt2img", seeds=(7,), no_t5=False, **kwargs) -> list[np.ndarray]:
        key = (mode, no_t5)
        if key not in pipes:
            skip = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
            base = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **skip)
            cls = {"txt2img": StableDiffusion3Pipeline, "img2img": StableDiffusion3Img2ImgPipeline,
                   "inpaint": StableDiffusion3InpaintPipeline}[mode]
            pipes[key] = cls.from_pipe(base)
            pipes[key].set_progress_bar_config(disable=True)
        size = {} if mode == "img2img" else {"width": 64, "height": 64}
        scheduler, steps = kwargs.pop("scheduler", None), kwargs.pop("num_inference_steps", 2)
        pipe = pipes[key] if scheduler is None else type(pipes[key]).from_pipe(pipes[key], scheduler=scheduler)
        with torch.inference_mode():
            images = pipe(prompt=[kwargs.pop("prompt", PROMPT)] * len(seeds), num_inference_steps=steps,
                                guidance_scale=5.0, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                                **size, **kwargs).images
        return [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]

    return run


def test_txt2img_equals_bare_diffusers(engine, bare):
    result = generate(engine, num_outputs=2)
    expected = bare(seeds=(7, 8))
    assert np.array_equal(pixels(result, 0), expected[0]) and np.array_equal(pixels(result, 1), expected[1])
    assert "Sampler: Euler" in result.parameters and "Model: tiny-sd3" in result.parameters


def test_img2img_and_inpaint_equal_bare_diffusers(engine, bare, init, mask):
    assert np.array_equal(pixels(generate(engine, image=png(init), strength=0.8)),
                          bare("img2img", image=init, strength=0.8)[0])
    assert np.array_equal(pixels(generate(engine, image=png(init), mask=png(mask), strength=0.8)),
                          bare("inpaint", image=init, mask_image=mask, strength=0.8)[0])


def test_explicit_sigmas_equal_bare_diffusers_with_them_unshifted(engine, bare, tiny_bucket):
    # ComfyUI's `simple` at 3 steps on SD3's shift 3.0 (not diffusers' default schedule); bare diffusers runs given
    # sigmas as given with its scheduler's shift at 1.0
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sd_core import comfy_samplers

    sigmas = comfy_samplers.flow_schedule(None, "simple", 3, None, 3.0)
    config = FlowMatchEulerDiscreteScheduler.load_config(tiny_bucket / "tiny-sd3" / "diffusers" / "scheduler")
    unshifted = FlowMatchEulerDiscreteScheduler.from_config(config, shift=1.0)
    result = generate(engine, sigmas=sigmas, num_inference_steps=None)
    assert np.array_equal(pixels(result, 0), bare(sigmas=sigmas, scheduler=unshifted, num_inference_steps=3)[0])
    assert not np.array_equal(pixels(result, 0), pixels(generate(engine, num_inference_steps=3), 0))


def test_manifest_without_t5_equals_bare_diffusers_without_it(engine, bare):
    no_t5 = pixels(generate(engine, model="tiny-sd3-no-t5"))
    assert np.array_equal(no_t5, bare(no_t5=True)[0])
    assert not np.array_equal(no_t5, bare()[0])  # T5 conditions the image when it is there
    assert engine.pool.get("tiny-sd3-no-t5").pipes["txt2img"].text_encoder_3 is None


def test_max_sequence_length_changes_the_image_and_is_refused_for_sd15(engine, bare):
    result = generate(engine, max_sequence_length=4)
    short = pixels(result)
    assert np.array_equal(short, bare(max_sequence_length=4)[0])
    assert "Max sequence length: 4" in result.parameters
    assert not np.array_equal(short, pixels(generate(engine)))
    with pytest.raises(InvalidRequest) as info:
        engine.generate(GenerationRequest(prompt=PROMPT, model="tiny-sd15", max_sequence_length=77))
    assert str(info.value) == ("max_sequence_length: 'tiny-sd15' is a sd15 model, which has no T5 text encoder; "
                               "leave max_sequence_length empty")


@pytest.mark.parametrize("name", ["DPM++ 2M Karras", "Euler a", "Euler Karras"])
def test_samplers_it_cannot_run_are_refused_naming_sampler_and_family(engine, name):
    with pytest.raises(InvalidRequest) as info:
        generate(engine, scheduler=name)
    assert str(info.value) == (f"scheduler: '{name}' does not run tiny-sd3's model family (sd3); valid: Euler")


def test_euler_is_the_default_and_builds_the_flow_matching_scheduler(engine):
    assert engine.resolve(GenerationRequest(prompt="a", model="tiny-sd3"))[1].scheduler == "Euler"
    model = engine.pool.get("tiny-sd3")
    assert type(model.scheduler("Euler")).__name__ == "FlowMatchEulerDiscreteScheduler"


PLAIN_TEXT = "whose prompts are plain text here"


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"prompt": "a (red:1.3) fox"}, "prompt", PLAIN_TEXT),
    ({"negative_prompt": "blur BREAK noise"}, "negative_prompt", PLAIN_TEXT),
    ({"prompt": "a [fox:cat:0.5]", "num_inference_steps": 4}, "prompt", PLAIN_TEXT),  # (at 2 steps: "a fox" only)
    ({"tiling": True}, "tiling", "which has no seamless tiling"),
    ({"hires": {"scale": 2}}, "hires", "which has no hires fix"),
    ({"embeddings": [{"name": "neg", "source": "https://example.com/e.safetensors"}]}, "embeddings",
     "which takes no textual-inversion embeddings"),
    ({"vae": "tiny-vae"}, "vae", "which has no alternate VAE"),
    ({"ip_adapters": [{"image": "https://example.com/a.png"}]}, "ip_adapters", "which has no IP-Adapter"),
    ({"image": png(Image.new("RGB", (64, 64))), "mask": png(Image.new("L", (64, 64), 255)),
      "inpaint_fill": "latent_noise"}, "inpaint_fill", "which has no latent noise / latent nothing fill"),
])
def test_features_it_does_not_run_are_refused_clearly(engine, fields, field, reason):
    with pytest.raises(InvalidRequest) as info:
        generate(engine, **fields)
    assert str(info.value).startswith(f"{field}: 'tiny-sd3' is a sd3 model, {reason}")


def test_escaped_brackets_and_a_plain_negative_prompt_are_plain_text(engine, bare):
    result = generate(engine, prompt=r"a red fox \(in the snow\)", negative_prompt=r"blur \[noise\]")
    expected = bare(prompt="a red fox (in the snow)", negative_prompt=["blur [noise]"])[0]
    assert np.array_equal(pixels(result), expected)


def test_variation_seeds_move_from_the_seeds_image_to_the_subseeds(engine):
    seed_image, subseed_image = pixels(generate(engine)), pixels(generate(engine, seed=11))
    assert np.array_equal(pixels(generate(engine, subseed=11, subseed_strength=0.0)), seed_image)
    # Euler on flow matching adds no noise after the first: strength 1 is exactly the subseed's image
    assert np.array_equal(pixels(generate(engine, subseed=11, subseed_strength=1.0)), subseed_image)
    halfway = generate(engine, subseed=11, subseed_strength=0.5)
    assert not np.array_equal(pixels(halfway), seed_image) and not np.array_equal(pixels(halfway), subseed_image)
    assert "Variation seed: 11, Variation seed strength: 0.5" in halfway.parameters


def test_clip_skip_and_sd_controlnets_refused(engine):  # SD3's own ControlNets: tests/sd_core/test_sd3_controlnet.py
    with pytest.raises(InvalidRequest, match="^clip_skip: 'tiny-sd3' is a sd3 model, which takes no clip skip"):
        generate(engine, clip_skip=1)
    with pytest.raises(InvalidRequest, match=r"^controlnets.0.model: ControlNet 'tiny-control-a' is made for another "
                                             r"architecture \(ControlNetModel, not an SD3 ControlNet\) than tiny-sd3"):
        generate(engine, controlnets=[{"model": "tiny-control-a", "image": png(Image.new("RGB", (64, 64)))}])


def test_lora_changes_the_image_and_unloads_exactly(engine):
    base = pixels(generate(engine))
    styled = generate(engine, prompt=PROMPT + " <lora:tiny-sd3-style:1>")
    assert not np.array_equal(pixels(styled), base)
    assert "<lora:tiny-sd3-style:1>" in styled.parameters
    half = pixels(generate(engine, loras=[{"source": "tiny-sd3-style", "scale": 0.5}]))
    assert not np.array_equal(half, base) and not np.array_equal(half, pixels(styled))
    assert np.array_equal(pixels(generate(engine)), base)


def test_lora_fused_after_repeats_and_unfused_back_to_the_base(make_engine):
    engine = make_engine(lora_fuse_after=2)
    base = pixels(generate(engine))
    specs = [{"source": "tiny-sd3-style", "scale": 0.7}]
    unfused = pixels(generate(engine, loras=specs))
    generate(engine, loras=specs)  # second use in a row: fused after it
    assert engine.loras._states[engine.pool.get("tiny-sd3")].fused
    assert np.abs(pixels(generate(engine, loras=specs)) - unfused).max() <= 2
    assert np.array_equal(pixels(generate(engine)), base)  # unfused: the base transformer's weights restored


def test_single_file_is_detected_and_gives_the_folder_image(engine, tiny_bucket):
    assert families.detect_architecture(checkpoint_keys(tiny_bucket / "tiny-sd3" / "tiny-sd3.safetensors")) == "sd3"
    single = generate(engine, model="tiny-sd3-single")
    again = generate(engine, model="tiny-sd3-single")  # T5 in inference mode: no dropout, the same image each time
    assert np.array_equal(pixels(single), pixels(again))
    assert np.abs(pixels(single) - pixels(generate(engine))).max() <= 2  # same weights; float order may differ


def test_manifest_skip_components_is_checked_against_the_family():
    with pytest.raises(ValueError, match="'text_encoder_3' is not an optional component of sd15 models"):
        ModelManifest(name="m", architecture="sd15", format="diffusers", uri="m/", skip_components=["text_encoder_3"])


def test_a1111_txt2img_payload_runs_with_euler(engine, bare):
    request = a1111.to_request(a1111.parse_call({
        "prompt": PROMPT, "sampler_name": "Euler", "scheduler": "Automatic", "steps": 2, "cfg_scale": 5.0,
        "seed": 7, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-sd3"}}))
    assert np.array_equal(pixels(engine.generate(request)), bare()[0])
