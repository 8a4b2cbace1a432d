"""Model families (sd_core/families): the registry, single-file detection on the tiny checkpoints, no branches."""

import re
from pathlib import Path

import pytest

from sd_core import families
from sd_core.checkpoints import checkpoint_keys
from sd_core.errors import InvalidRequest, ManifestError
from sd_core.families.base import ModelFamily
from sd_core.manifests import ModelManifest
from sd_core.schema import GenerationRequest

SD_CORE = Path(__file__).resolve().parents[2] / "sd_core"


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_single_file_checkpoints_are_detected_by_their_keys(tiny_bucket, architecture):
    keys = checkpoint_keys(tiny_bucket / f"tiny-{architecture}" / f"tiny-{architecture}.safetensors")
    assert families.detect_architecture(keys) == architecture
    assert [name for name, family in families.FAMILIES.items() if family.detect(keys)] == [architecture]


def test_sd2_openclip_keys_and_unknown_layouts():
    sd2 = ["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "model.diffusion_model.out.0.bias"]
    assert families.detect_architecture(sd2) == "sd2"
    assert families.detect_architecture(["unet.conv_in.weight", "model.diffusion_model.out.0.bias"]) is None
    assert families.detect_architecture([]) is None


def test_the_manifest_architectures_are_the_registry():
    assert families.NAMES == ("sd15", "sd2", "sdxl", "sdxl-refiner", "flux", "sd3", "flux-fill")
    for name in families.NAMES:
        manifest = ModelManifest(name="m", architecture=name, format="diffusers", uri="m/")
        assert manifest.family is families.family(name)
        assert manifest.defaults.width == manifest.family.width
    with pytest.raises(ManifestError, match="unknown architecture 'sd9'"):
        families.family("sd9")


def test_every_family_names_a_pipeline_per_mode_and_an_estimate():
    for family in families.FAMILIES.values():
        assert set(family.pipelines) == {"txt2img", "img2img", "inpaint"}
        assert family.memory_bytes() > 2**30 and family.schedulers()


def test_an_empty_negative_prompt_reaches_the_pipeline_as_none():
    # SDXL's force_zeros_for_empty_prompt then zeros the negative embedding, as bare diffusers and A1111 do.
    sdxl = families.family("sdxl")
    assert sdxl.prompt_kwargs(["a", "b"], ["", ""]) == {"prompt": ["a", "b"], "negative_prompt": None}
    assert sdxl.prompt_kwargs(["a"], ["blur"]) == {"prompt": ["a"], "negative_prompt": ["blur"]}


def test_no_architecture_branches_outside_the_families_package():
    literal = re.compile(r"""["'](sd15|sd2|sdxl)["']""")
    found = [f"{path.relative_to(SD_CORE)}:{number}"
             for path in SD_CORE.rglob("*.py") if "families" not in path.parts
             for number, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert found == []


class _EulerOnly(ModelFamily):
    def schedulers(self) -> tuple[str, ...]:
        return ("Euler",)


def test_a_family_limits_the_schedulers_its_models_run(engine, monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "sd15", _EulerOnly(**vars(families.family("sd15"))))
    assert engine.resolve(GenerationRequest(prompt="a fox", scheduler="euler"))[1].scheduler == "Euler"
    with pytest.raises(InvalidRequest) as info:
        engine.resolve(GenerationRequest(prompt="a fox", scheduler="DPM++ 2M Karras"))
    assert str(info.value) == ("scheduler: 'DPM++ 2M Karras' does not run tiny-sd15's model family (sd15); valid: "
                               "Euler")
