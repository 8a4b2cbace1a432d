"""Model handling in the engine: manifests, the pipeline LRU and its memory budget, pickle refusal, cold start."""

import shutil

import pytest
import yaml

from sd_core.errors import ManifestError, UnsafeCheckpoint
from sd_core.manifests import ModelCatalog, load_manifest
from sd_core.schema import GenerationRequest


def write_manifest(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{fields['name']}.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


def test_second_model_loads_without_reloading_the_first(make_engine):
    engine = make_engine()
    engine.generate(GenerationRequest(model="tiny-sd15", seed=1))
    first = engine.pool.get("tiny-sd15")
    engine.generate(GenerationRequest(model="tiny-sdxl", seed=1))
    engine.generate(GenerationRequest(model="tiny-sd15", seed=1))
    assert engine.pool.get("tiny-sd15") is first
    assert engine.pool.loaded == ["tiny-sdxl", "tiny-sd15"]


def test_memory_budget_evicts_least_recently_used(make_engine):
    engine = make_engine(pipeline_memory_mb=0)
    engine.generate(GenerationRequest(model="tiny-sd15", seed=1))
    one_model = engine.pool.get("tiny-sd15").nbytes
    engine.pool.budget = int(one_model * 1.5)  # room for one tiny model, not two
    engine.generate(GenerationRequest(model="tiny-sdxl", seed=1))
    assert engine.pool.loaded == ["tiny-sdxl"]
    engine.generate(GenerationRequest(model="tiny-sd15", seed=1))
    assert engine.pool.loaded == ["tiny-sd15"]


def test_memory_budget_setting(make_engine):
    assert make_engine(pipeline_memory_mb=123).pool.budget == 123 * 2**20


def test_preload_loads_the_configured_models(make_engine):
    engine = make_engine(preload_models=("tiny-sd15", "tiny-sdxl"))
    timings = engine.preload()
    assert set(timings) == {"tiny-sd15", "tiny-sdxl", "warmup"} and engine.pool.loaded == ["tiny-sd15", "tiny-sdxl"]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused(make_engine, engine_settings, tmp_path, suffix):
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(b"\x80\x04not really a pickle")
    models = tmp_path / "models"
    write_manifest(models, name="pickled", architecture="sd15", format="single_file", uri=str(checkpoint),
                   config_uri=str(engine_settings.weights_uri) + "/tiny-sd15/config/")
    engine = make_engine(models_dir=models, default_model="pickled")
    with pytest.raises(UnsafeCheckpoint, match=f"model: model{suffix}: pickle checkpoints"):
        engine.generate(GenerationRequest())


def test_a_component_with_only_pickle_weights_inside_a_diffusers_folder_is_refused(make_engine, engine_settings,
                                                                                   tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(f"{engine_settings.weights_uri}/tiny-sd15/diffusers", folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # beside safetensors a .bin is never loaded
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    models = tmp_path / "models"
    write_manifest(models, name="mixed", architecture="sd15", format="diffusers", uri=str(folder) + "/")
    with pytest.raises(UnsafeCheckpoint, match="diffusion_pytorch_model.bin"):
        make_engine(models_dir=models, default_model="mixed").generate(GenerationRequest())


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"architecture": "sd9"}, "architecture"),
        ({"format": "single_file"}, "config_uri: required"),
        ({"defaults": {"scheduler": "Euler z"}}, "defaults.scheduler"),
        ({"defaults": {"width": 100}}, "defaults.width"),
        ({"sha256": "abc"}, "sha256"),
        ({"colour": "red"}, "colour: unknown field"),
    ],
)
def test_bad_manifest_is_a_clear_startup_error(tmp_path, fields, message):
    base = {"name": "m", "architecture": "sd15", "format": "diffusers", "uri": "m/"}
    path = write_manifest(tmp_path, **{**base, **fields})
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_duplicate_model_names_are_refused(tmp_path):
    write_manifest(tmp_path / "a", name="same", architecture="sd15", format="diffusers", uri="x/")
    (tmp_path / "a" / "other.yaml").write_text((tmp_path / "a" / "same.yaml").read_text())
    with pytest.raises(ManifestError, match="defined twice"):
        ModelCatalog.from_dir(tmp_path / "a")


def test_architecture_defaults_fill_manifest_gaps(tmp_path):
    path = write_manifest(tmp_path, name="xl", architecture="sdxl", format="diffusers", uri="xl/")
    defaults = load_manifest(path).defaults
    assert (defaults.width, defaults.height, defaults.num_inference_steps) == (1024, 1024, 30)


def test_hub_is_offline_in_tests():
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
