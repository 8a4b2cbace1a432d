"""hf:// diffusers folders as hub repos ship them: pickle, Flax and OpenVINO files beside the safetensors are neither
fetched nor a reason to refuse the model; a component with pickle weights only is refused (SD_ALLOW_PICKLE off)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sd_core import storage
from sd_core.errors import UnsafeCheckpoint
from tests.sd_core.test_runpod_model_cache import COMMIT, REPO, REQUEST, hub_tree, pixels, read_only, settings_for

EXTRAS = {  # what SDXL base ships beside its safetensors (openvino_model.bin, flax_model.msgpack, pytorch_model.bin)
    "text_encoder/openvino_model.bin": b"not a pickle, never to be loaded",
    "text_encoder/openvino_model.xml": b"<xml/>",
    "text_encoder/flax_model.msgpack": b"\x80flax",
    "unet/diffusion_pytorch_model.bin": b"\x80\x02pickle that must never be loaded",
    "unet/diffusion_flax_model.msgpack": b"\x80flax",
}


def repo_with(source: Path, folder: Path, extras: dict[str, bytes], drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, folder)
    for rel, body in extras.items():
        (folder / rel).write_bytes(body)
    for rel in drop:
        (folder / rel).unlink()
    return folder


def test_a_hub_snapshot_with_pickle_files_beside_safetensors_loads_them_never(engine, engine_settings, tiny_bucket,
                                                                               tmp_path):
    from sd_core.engine import Engine

    hub = tmp_path / "hub"
    hub_tree(hub, repo_with(tiny_bucket / "tiny-sd15" / "diffusers", tmp_path / "repo", EXTRAS))
    read_only(hub)
    settings = settings_for(engine_settings, tmp_path, f"hf://{REPO}@{COMMIT}/", hf_model_cache=hub)
    result = Engine(settings).generate(REQUEST.model_copy(update={"model": "cached"}))
    # the same pixels as the plain tiny-sd15 folder: the .bin/.msgpack files were not loaded (the unet's would fail)
    assert np.array_equal(pixels(result), pixels(engine.generate(REQUEST.model_copy(update={"model": "tiny-sd15"}))))


def test_a_component_with_only_pickle_weights_is_refused(engine_settings, tiny_bucket, tmp_path):
    from sd_core.engine import Engine

    hub = tmp_path / "hub"
    hub_tree(hub, repo_with(tiny_bucket / "tiny-sd15" / "diffusers", tmp_path / "repo", EXTRAS,
                            drop=("unet/diffusion_pytorch_model.safetensors",)))
    settings = settings_for(engine_settings, tmp_path, f"hf://{REPO}@{COMMIT}/", hf_model_cache=hub)
    with pytest.raises(UnsafeCheckpoint, match=r"diffusion_pytorch_model\.bin: pickle checkpoints"):
        Engine(settings).generate(REQUEST.model_copy(update={"model": "cached"}))


# --- what fetch_hf downloads from the hub: a fake repo served through huggingface_hub's two calls ----------------
SDXL_LAYOUT = [
    "model_index.json", "README.md", ".gitattributes", "01.png", "sd_xl_base_1.0.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/model.onnx", "text_encoder/openvino_model.bin", "text_encoder/openvino_model.xml",
    "text_encoder/flax_model.msgpack", "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_flax_model.msgpack",
    "unet/diffusion_pytorch_model.bin", "unet/openvino_model.bin", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "vae_1_0/diffusion_pytorch_model.safetensors",
]
MODEL_INDEX = ('{"_class_name": "StableDiffusionXLPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"], '
               '"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"], '
               '"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], '
               '"image_encoder": [null, null]}')


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub's hf_hub_download / snapshot_download over an in-memory repo listing (no hub access):
    snapshot_download filters the listing with huggingface_hub's own filter_repo_objects, as it does for real."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import filter_repo_objects

    repo: dict[str, str] = {}
    out = tmp_path / "snapshot"

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **_):
        if filename not in repo:
            raise hf_errors.EntryNotFoundError(f"{filename} not found")
        (out / filename).parent.mkdir(parents=True, exist_ok=True)
        (out / filename).write_text(repo[filename])
        return str(out / filename)

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, ignore_patterns=None, **_):
        for name in filter_repo_objects(list(repo), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            hf_hub_download(repo_id, name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repo, out


def fetched(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_fetch_hf_downloads_only_what_the_pipeline_loads(fake_hub, engine_settings, tmp_path, allow_pickle):
    import dataclasses

    repo, out = fake_hub
    repo.update({name: "x" for name in SDXL_LAYOUT}, **{"model_index.json": MODEL_INDEX})
    settings = dataclasses.replace(engine_settings, cache_dir=tmp_path / "c", hf_model_cache=tmp_path / "none",
                                   allow_pickle=allow_pickle)
    assert storage.fetch("hf://org/sdxl@main/", settings) == out
    expected = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors"}
    if allow_pickle:  # the operator trusts pickle: the loader may fall back on them; exports stay out
        expected |= {"text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.bin"}
    assert fetched(out) == expected


def test_fetch_hf_downloads_a_manifests_variant_instead_of_the_plain_weights(fake_hub, engine_settings, tmp_path):
    import dataclasses

    repo, out = fake_hub
    repo.update({name: "x" for name in SDXL_LAYOUT}, **{"model_index.json": MODEL_INDEX,
                "unet/diffusion_pytorch_model.safetensors.index.fp16.json": "{}",
                "text_encoder/model.fp16-00001-of-00002.safetensors": "x"})
    settings = dataclasses.replace(engine_settings, cache_dir=tmp_path / "c", hf_model_cache=tmp_path / "none")
    storage.fetch("hf://org/sdxl@main/", settings, variant="fp16")
    weights = {name for name in fetched(out) if name.endswith(".safetensors")}
    assert weights == {"text_encoder/model.fp16.safetensors", "text_encoder/model.fp16-00001-of-00002.safetensors",
                       "unet/diffusion_pytorch_model.fp16.safetensors"}
    assert "unet/diffusion_pytorch_model.safetensors.index.fp16.json" in fetched(out)


def test_fetch_hf_folder_without_model_index(fake_hub, engine_settings, tmp_path):
    import dataclasses

    repo, out = fake_hub  # the safety checker's repo: one model folder at the top
    repo.update({"config.json": "{}", "preprocessor_config.json": "{}", "model.safetensors": "x",
                 "pytorch_model.bin": "x", "flax_model.msgpack": "x", "tf_model.h5": "x", "README.md": "x"})
    settings = dataclasses.replace(engine_settings, cache_dir=tmp_path / "c", hf_model_cache=tmp_path / "none")
    storage.fetch("hf://CompVis/safety@main/", settings)
    assert fetched(out) == {"config.json", "preprocessor_config.json", "model.safetensors"}
