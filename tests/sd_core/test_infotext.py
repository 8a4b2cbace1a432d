"""A1111 infotext (sd_core/outputs.py, Engine.finish): read back by A1111's rules, it gives the same settings, LoRAs,
model hash and noise schedule that made the image."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from sd_core.manifests import ModelCatalog, ModelManifest
from sd_core.outputs import infotext, read_parameters
from sd_core.schedulers import SCHEDULER_NAMES
from sd_core.schema import GenerationRequest
from tests.fixtures import a1111_infotext as a1111


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


# --- the format ------------------------------------------------------------------------------------------------------
def test_values_with_separators_round_trip():
    text = infotext(
        prompt="a fox, running:fast\nsecond line", negative_prompt='blurry, "ugly"\nlow quality', steps=7,
        sampler="Euler a", cfg_scale=6.5, seed=123, width=64, height=96, model="my-model", model_hash="ab" * 32,
        strength=0.35, lora_hashes={"ink": "cd" * 32, "odd:name,x": "ef" * 32},
    )
    got = a1111.parse(text)
    assert got["Prompt"] == "a fox, running:fast\nsecond line"
    assert got["Negative prompt"] == 'blurry, "ugly"\nlow quality'
    assert (got["Steps"], got["CFG scale"], got["Seed"]) == ("7", "6.5", "123")
    assert (got["Size-1"], got["Size-2"]) == ("64", "96")
    assert (got["Model"], got["Model hash"], got["Denoising strength"]) == ("my-model", "ab" * 5, "0.35")
    assert a1111.lora_hashes(got) == {"ink": "cd" * 6, "oddnamex": "ef" * 6}


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_a1111_runs_the_same_sampler_and_schedule(name):
    # A1111's `Automatic` is Karras for DPM++ 2M: a plain name here (diffusers' evenly spaced steps) must not read so.
    text = infotext(prompt="x", negative_prompt="", steps=4, sampler=name, cfg_scale=7, seed=1, width=64, height=64,
                    model="m")
    sampler, schedule = a1111.sampler_and_schedule(a1111.parse(text))
    assert "Schedule type: " in text
    labels = sorted(a1111.SCHEDULES, key=len, reverse=True)  # "SGM Uniform" before "Uniform"
    spelled = next((label for label in labels if name.endswith(" " + label)), None)
    assert sampler == (name.removesuffix(" " + spelled) if spelled else name)
    assert schedule == (spelled or "Uniform")


# --- through the engine ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pinned_engine(engine_settings, tiny_bucket):
    """An engine whose single-file tiny model pins its checkpoint's sha256 (the repo manifest pins none)."""
    from sd_core.engine import Engine

    catalog = ModelCatalog.from_dir(engine_settings.models_dir)
    manifests: dict[str, ModelManifest] = dict(catalog.manifests)
    single = manifests["tiny-sd15-single"]
    digest = sha256(tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors")
    manifests[single.name] = single.model_copy(update={"sha256": digest})
    return Engine(engine_settings, catalog=ModelCatalog(manifests))


def test_png_infotext_round_trips_settings_loras_and_hashes(pinned_engine, tiny_bucket):
    request = GenerationRequest(
        model="tiny-sd15-single", prompt="a red fox, in the snow <lora:tiny-style:0.7>", negative_prompt="blurry",
        loras=[{"source": "tiny-style-kohya", "scale": 0.5, "text_encoder_scale": 0.25}], scheduler="DPM++ 2M Karras",
        num_inference_steps=3, guidance_scale=6.5, seed=42, num_outputs=2,
    )
    result = pinned_engine.generate(request)
    for index, seed in enumerate((42, 43)):
        got = a1111.parse(read_parameters(result.images[index].data))
        assert got["Prompt"] == "a red fox, in the snow <lora:tiny-style:0.7> <lora:tiny-style-kohya:0.25:0.5>"
        assert a1111.loras(got["Prompt"]) == {"tiny-style": (0.7, 0.7), "tiny-style-kohya": (0.25, 0.5)}
        assert got["Negative prompt"] == "blurry"
        assert (got["Steps"], got["CFG scale"], got["Seed"]) == ("3", "6.5", str(seed))
        assert (got["Size-1"], got["Size-2"], got["Model"]) == ("64", "64", "tiny-sd15-single")
        assert a1111.sampler_and_schedule(got) == ("DPM++ 2M", "Karras") and got["Schedule type"] == "Karras"
        assert got["Model hash"] == sha256(tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors")[:10]
        assert a1111.lora_hashes(got) == {
            "tiny-style": sha256(tiny_bucket / "loras" / "tiny-sd15-peft.safetensors")[:12],
            "tiny-style-kohya": sha256(tiny_bucket / "loras" / "tiny-sd15-kohya.safetensors")[:12],
        }
        assert "Lora weights" not in got and "Denoising strength" not in got
    assert result.parameters == read_parameters(result.images[0].data)

    # The infotext alone is enough to make the image again: its prompt (tags included) and settings, nothing else.
    got = a1111.parse(result.parameters)
    sampler, schedule = a1111.sampler_and_schedule(got)
    again = pinned_engine.generate(GenerationRequest(
        model=got["Model"], prompt=got["Prompt"], negative_prompt=got["Negative prompt"],
        scheduler=f"{sampler} {schedule}" if schedule != "Uniform" else sampler,
        num_inference_steps=int(got["Steps"]), guidance_scale=float(got["CFG scale"]), seed=int(got["Seed"]),
        width=int(got["Size-1"]), height=int(got["Size-2"]),
    ))
    assert np.abs(pixels(again) - pixels(result)).max() <= 1


def test_a_manifest_default_scale_is_written_and_a_folder_model_has_no_hash(engine, tiny_bucket):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, format="PNG")
    result = engine.generate(GenerationRequest(
        model="tiny-sd15", prompt="<lora:tiny-style> a boat", image=base64.b64encode(buffer.getvalue()).decode(),
        strength=0.6, num_inference_steps=4, seed=5, scheduler="Euler a",
    ))
    got = a1111.parse(read_parameters(result.images[0].data))
    assert got["Prompt"] == "<lora:tiny-style:1> a boat"  # the weight used, explicit
    assert got["Denoising strength"] == "0.6" and "Model hash" not in got  # a diffusers folder has no one file
    assert (got["Sampler"], got["Schedule type"]) == ("Euler a", "Automatic")
    assert a1111.lora_hashes(got) == {"tiny-style": sha256(tiny_bucket / "loras" / "tiny-sd15-peft.safetensors")[:12]}
