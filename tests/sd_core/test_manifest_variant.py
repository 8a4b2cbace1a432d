"""A manifest's `variant` (fp16, as the hub's SDXL/SD1.5 repos ship `unet/diffusion_pytorch_model.fp16.safetensors`):
the engine loads that variant's files, equal to bare diffusers `from_pretrained(..., variant=...)`."""

import dataclasses
import io

import numpy as np
import pytest
import yaml
from PIL import Image

from sd_core.errors import ManifestError
from sd_core.manifests import ModelCatalog
from sd_core.schema import GenerationRequest

PROMPT = "a red fox in the snow"
FAST = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64, "height": 64,
        "scheduler": "Euler"}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def variant_folder(tiny_bucket, tmp_path_factory):
    """tiny-sd15 saved twice in one folder: plain files, and `fp16`-variant files whose UNet differs."""
    import torch
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("variant") / "tiny-sd15-variant"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True)
    pipe.save_pretrained(folder)
    with torch.no_grad():
        for parameter in pipe.unet.parameters():
            parameter.mul_(1.5)
    pipe.save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    return folder


def bare(folder, variant):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, variant=variant)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    with torch.inference_mode():
        image = pipe(prompt=PROMPT, num_inference_steps=2, guidance_scale=7.0, width=64, height=64, output_type="pil",
                     generator=torch.Generator("cpu").manual_seed(3)).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_the_manifest_variant_is_what_loads_and_equals_bare_diffusers(variant_folder, engine_settings, tmp_path):
    from sd_core.engine import Engine

    models = tmp_path / "models"
    models.mkdir()
    for name, variant in (("plain", None), ("halves", "fp16")):
        manifest = {"name": name, "architecture": "sd15", "format": "diffusers", "uri": f"{variant_folder}/"}
        (models / f"{name}.yaml").write_text(yaml.safe_dump(manifest | ({"variant": variant} if variant else {})))
    engine = Engine(dataclasses.replace(engine_settings, models_dir=models, default_model="plain"))
    plain = pixels(engine.generate(GenerationRequest(**FAST, model="plain")))
    halves = pixels(engine.generate(GenerationRequest(**FAST, model="halves")))
    assert np.array_equal(plain, bare(variant_folder, None))
    assert np.array_equal(halves, bare(variant_folder, "fp16"))
    assert np.abs(plain - halves).mean() > 1  # the variant's other UNet: another image


def test_a_variant_is_refused_for_a_single_file(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "name": "m", "architecture": "sd15", "format": "single_file", "uri": "m.safetensors", "config_uri": "c/",
        "variant": "fp16"}))
    with pytest.raises(ManifestError, match="variant"):
        ModelCatalog.from_dir(tmp_path)
