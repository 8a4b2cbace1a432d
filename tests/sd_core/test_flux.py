"""FLUX.1 on the tiny FLUX twin (devtools/tiny_flux.py): equal to bare diffusers' Flux pipelines, distilled guidance,
what FLUX refuses, LoRAs in three layouts, max_sequence_length and the memory options."""

import io
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sd_core.a1111 import A1111Call, to_request
from sd_core.device import Placement
from sd_core.errors import InvalidRequest, ManifestError
from sd_core.families import FAMILIES, detect_architecture
from sd_core.manifests import ModelManifest
from sd_core.memory_options import memory_plan
from sd_core.schema import GenerationRequest
from tests.fixtures.images import box_mask, noise_image
from tests.fixtures.images import png_b64 as png

PROMPT = "a red cat in the snow"


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"))


def generate(engine, **fields):
    return engine.generate(GenerationRequest(**{"model": "tiny-flux", "prompt": PROMPT, "seed": 3, **fields}))


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    """Plain diffusers: the tiny FLUX pipelines, called as their documentation shows, at the manifest's defaults."""
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_bucket / "tiny-flux" / "diffusers", local_files_only=True,
                                        torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    classes = {"txt2img": FluxPipeline, "img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}

    def run(mode="txt2img", seed=3, **kwargs):
        call = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=32,
                    generator=[torch.Generator("cpu").manual_seed(seed)], height=64, width=64)
        call.update(kwargs)
        runner = pipe if mode == "txt2img" else classes[mode].from_pipe(pipe)
        with torch.inference_mode():
            return np.asarray(runner(**call).images[0].convert("RGB"))

    return run


@pytest.fixture(scope="module")
def init():
    return noise_image()


@pytest.fixture(scope="module")
def mask():
    return box_mask((16, 16, 48, 48))


def test_txt2img_equals_bare_flux_pipeline(engine, bare):
    result = generate(engine)
    assert np.array_equal(pixels(result), bare())
    assert result.request.scheduler == "Euler" and result.request.max_sequence_length == 32


def test_img2img_and_inpaint_equal_bare_flux_pipelines(engine, bare, init, mask):
    img2img = generate(engine, image=png(init), strength=0.75)
    assert np.array_equal(pixels(img2img), bare("img2img", image=init, strength=0.75))
    inpaint = generate(engine, image=png(init), mask=png(mask), strength=0.75)
    assert np.array_equal(pixels(inpaint), bare("inpaint", image=init, mask_image=mask, strength=0.75))


def test_guidance_is_flux_guidance_and_changes_the_image(engine, bare):
    strong = pixels(generate(engine, guidance_scale=8.0))
    assert not np.array_equal(strong, pixels(generate(engine)))
    assert np.array_equal(strong, bare(guidance_scale=8.0))


def test_max_sequence_length_is_passed_and_bounded(engine, bare):
    assert np.array_equal(pixels(generate(engine, max_sequence_length=8)), bare(max_sequence_length=8))
    with pytest.raises(ValueError, match="max_sequence_length"):
        GenerationRequest(max_sequence_length=513)
    with pytest.raises(InvalidRequest, match="^max_sequence_length: 'tiny-sd15' is a sd15 model, which has no T5"):
        engine.generate(GenerationRequest(model="tiny-sd15", max_sequence_length=77))


def test_explicit_sigmas_equal_bare_flux_pipeline_called_with_them(engine, bare):
    # ComfyUI's `simple` schedule at 3 steps for a dev-like model (mu 1.15): 3 does not divide its 10000-entry table,
    # so it is not diffusers' default; tiny-flux's scheduler has shift 1.0, so bare diffusers runs the sigmas as given
    from sd_core import comfy_samplers

    sigmas = comfy_samplers.flow_schedule(None, "simple", 3, 1.15)
    result = generate(engine, sigmas=sigmas)
    assert result.request.num_inference_steps == 3 and result.request.sigmas == sigmas
    assert "Steps: 3, Sampler: Euler," in result.parameters
    assert f"Sigmas: {' '.join(f'{s:.8g}' for s in sigmas)}, Version" in result.parameters
    assert np.array_equal(pixels(result), bare(num_inference_steps=3, sigmas=sigmas))
    assert not np.array_equal(pixels(result), pixels(generate(engine, num_inference_steps=3)))
    img2img = generate(engine, image=png(Image.fromarray(bare())), strength=0.7, sigmas=sigmas)
    assert np.array_equal(pixels(img2img), bare("img2img", image=Image.fromarray(bare()), strength=0.7,
                                                num_inference_steps=3, sigmas=sigmas))


def test_jobs_with_different_sigmas_never_share_a_batch():
    from sd_core.jobs import Job

    jobs = [Job(request=GenerationRequest(model="m", sigmas=sigmas), manifest=None, width=64, height=64, seeds=[1])
            for sigmas in ([1.0, 0.5], [1.0, 0.25], None)]
    assert len({job.batch_key for job in jobs}) == 3


def test_explicit_sigmas_are_checked_and_flow_sigmas_are_at_most_1(engine):
    from sd_core.schema import parse_request

    for sigmas, reason in (([1.0, 1.0], "must decrease"), ([1.0, 0.0], "above 0"),
                           ([], "List should have at least 1 item")):
        with pytest.raises(InvalidRequest, match=f"^sigmas: .*{reason}"):
            parse_request({"sigmas": sigmas})
    with pytest.raises(InvalidRequest, match="^sigmas: 2 sigmas for num_inference_steps 3"):
        parse_request({"sigmas": [1.0, 0.5], "num_inference_steps": 3})
    # SD's sigmas reach about 15 (tests/sd_core/test_samplers.py); a flow-matching noise level is at most 1
    with pytest.raises(InvalidRequest, match="^sigmas: 'tiny-flux' is a flux model, whose sigmas are flow-matching "
                                             "noise levels: each must be at most 1"):
        generate(engine, sigmas=[1.5, 0.5])


@pytest.mark.parametrize(("fields", "message"), [
    ({"negative_prompt": "blurry"}, "^negative_prompt: 'tiny-flux' is a flux model, which takes no negative prompt"),
    ({"scheduler": "DPM++ 2M Karras"}, "^scheduler: 'DPM\\+\\+ 2M Karras' does not run tiny-flux's model family "
                                       "\\(flux\\); valid: Euler$"),
    ({"prompt": "a (red:1.3) cat"}, "^prompt: 'tiny-flux' is a flux model, whose prompts are plain text"),
    ({"prompt": "a cat BREAK a dog"}, "^prompt: .*plain text"),
    ({"clip_skip": 1}, "^clip_skip: 'tiny-flux' is a flux model, which takes no clip skip"),
    ({"subseed_strength": 0.5, "subseed": 2}, "^subseed_strength: .*no variation seeds"),
    ({"tiling": True}, "^tiling: .*no seamless tiling"),
    ({"hires": {"scale": 2}}, "^hires: .*no hires fix"),
])
def test_what_flux_cannot_run_is_refused_clearly(engine, fields, message):
    with pytest.raises(InvalidRequest, match=message):
        generate(engine, **fields)


def test_a_subseed_at_strength_0_is_the_seeds_image(engine):
    """A1111 clients send a subseed with strength 0: exactly the seed's image, no variation noise (FLUX has none)."""
    result = generate(engine, subseed=11, subseed_strength=0.0)
    assert np.array_equal(pixels(result), pixels(generate(engine))) and result.subseeds is None


def test_escaped_brackets_are_plain_text(engine, bare):
    result = generate(engine, prompt=r"a red cat \(in the snow\)")
    assert np.array_equal(pixels(result), bare(prompt="a red cat (in the snow)"))


@pytest.mark.parametrize("lora", ["tiny-flux-style", "tiny-flux-style-kohya", "tiny-flux-style-xlabs"])
def test_lora_layouts_load_change_the_image_and_unload_exactly(engine, lora):
    plain = pixels(generate(engine))
    styled = pixels(generate(engine, loras=[{"source": lora}]))
    assert not np.array_equal(plain, styled)
    assert np.array_equal(pixels(generate(engine, loras=[{"source": lora, "scale": 0.5}])),
                          pixels(generate(engine, prompt=f"{PROMPT} <lora:{lora}:0.5>")))
    assert np.array_equal(pixels(generate(engine)), plain)


def test_peft_and_kohya_files_hold_the_same_lora(engine):
    peft = pixels(generate(engine, loras=[{"source": "tiny-flux-style"}]))
    assert np.array_equal(peft, pixels(generate(engine, loras=[{"source": "tiny-flux-style-kohya"}])))


def test_lora_equals_bare_diffusers_load_lora_weights(engine, bare, tiny_bucket):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_bucket / "tiny-flux" / "diffusers", local_files_only=True,
                                        torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tiny_bucket / "loras" / "tiny-flux-kohya.safetensors"), adapter_name="k")
    with torch.inference_mode():
        expected = pipe(prompt=PROMPT, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=32, height=64,
                        width=64, generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    styled = pixels(generate(engine, loras=[{"source": "tiny-flux-style-kohya"}]))
    assert np.array_equal(styled, np.asarray(expected.convert("RGB")))


def test_a1111_payload_on_flux(engine, bare):
    """A1111's Euler (Automatic schedule) runs FLUX's flow-matching Euler; cfg_scale is FLUX's guidance."""
    payload = {"prompt": PROMPT, "sampler_name": "Euler", "scheduler": "Automatic", "cfg_scale": 3.5, "steps": 4,
               "seed": 3, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-flux"}}
    request = to_request(A1111Call("txt2img", payload))
    assert (request.scheduler, request.guidance_scale) == ("Euler", 3.5)
    assert np.array_equal(pixels(engine.generate(request)), bare())
    with pytest.raises(InvalidRequest, match="distilled_cfg_scale: unknown field"):
        to_request(A1111Call("txt2img", {**payload, "distilled_cfg_scale": 3.5}))
    with pytest.raises(InvalidRequest, match="^scheduler: 'Euler a' does not run tiny-flux's model family"):
        engine.generate(to_request(A1111Call("txt2img", {**payload, "sampler_name": "Euler a"})))


def test_single_file_detection():
    assert detect_architecture(["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"]) == "flux"
    assert detect_architecture(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) == "flux"
    assert detect_architecture(["conditioner.embedders.0.transformer.text_model.x"]) == "sdxl"


def manifest(**memory):
    return ModelManifest(name="m", architecture="flux", format="diffusers", uri="m/", memory=memory)


def test_memory_options(engine_settings):
    import dataclasses

    cpu = Placement(torch.device("cpu"), torch.float32)
    plan = memory_plan(manifest(offload="model"), engine_settings, cpu)
    assert (plan.offload, plan.quantize, plan.dtype) == ("none", "none", torch.float32)  # offload: no-op on CPU
    with pytest.raises(ManifestError, match="fp8 quantization .* needs a CUDA GPU"):
        memory_plan(manifest(quantize="fp8"), engine_settings, cpu)
    with pytest.raises(ManifestError, match="fp8 quantization .* needs a CUDA GPU"):
        memory_plan(manifest(), dataclasses.replace(engine_settings, quantize="fp8"), cpu)
    with pytest.raises(ManifestError, match="SD_OFFLOAD: unknown value 'sequential'"):
        memory_plan(manifest(), dataclasses.replace(engine_settings, offload="sequential"), cpu)
    with pytest.raises(ValueError, match="offload"):
        manifest(offload="sequential")
    # on CUDA (checked without a GPU: the plan only reads the placement): FLUX runs in bf16 when SD_DTYPE is auto
    cuda = Placement(torch.device("cuda"), torch.float16)
    auto = dataclasses.replace(engine_settings, dtype="auto")
    assert memory_plan(manifest(offload="model"), auto, cuda) == memory_plan(manifest(), auto, cuda).__class__(
        dtype=torch.bfloat16, offload="model")
    assert memory_plan(manifest(), dataclasses.replace(engine_settings, dtype="float16"), cuda).dtype == torch.float16
    sd = ModelManifest(name="s", architecture="sd15", format="diffusers", uri="s/")
    assert memory_plan(sd, auto, cuda).dtype == torch.float16


def test_fp8_on_a_cpu_worker_refuses_to_load(make_engine, engine_settings, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    spec = yaml.safe_load((engine_settings.models_dir / "tiny-flux.yaml").read_text())
    spec["memory"] = {"quantize": "fp8"}
    (models / "tiny-flux.yaml").write_text(yaml.safe_dump(spec))
    engine = make_engine(models_dir=models, default_model="tiny-flux")
    with pytest.raises(ManifestError, match="needs a CUDA GPU"):
        engine.generate(GenerationRequest(prompt=PROMPT))
    shutil.rmtree(models)


def test_manifest_max_sequence_length_only_for_t5_families():
    with pytest.raises(ValueError, match="no T5 text encoder"):
        ModelManifest(name="s", architecture="sd15", format="diffusers", uri="s/", defaults={"max_sequence_length": 77})
    assert FAMILIES["flux"].defaults["max_sequence_length"] == 512
