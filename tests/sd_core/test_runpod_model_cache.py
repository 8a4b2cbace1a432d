"""RunPod's cached models: hf:// weights found in a read-only hub cache tree load from there, no download, no hub."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sd_core import storage
from sd_core.errors import ChecksumMismatch, FetchError
from sd_core.schema import GenerationRequest
from sd_core.settings import REPO_ROOT, Settings, runpod_network_volume
from sd_core.storage.cache import WeightsCache

REPO = "tiny-org/tiny-sd15"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REQUEST = GenerationRequest(prompt="a red fox in the snow", seed=3, num_inference_steps=2)


def hub_tree(hub: Path, source: Path, commit: str = COMMIT, refs: dict[str, str] | None = None) -> Path:
    """`source`'s files as the hub cache lays out a snapshot: blobs by sha256, snapshot links to them, refs."""
    repo = hub / f"models--{REPO.replace('/', '--')}"
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = repo / "snapshots" / commit / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for name, target in (refs if refs is not None else {"main": commit}).items():
        (repo / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(target)
    return repo


def read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() else 0o444)


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def hub(tiny_bucket, tmp_path_factory) -> Path:
    """A read-only RunPod model cache holding tiny-sd15's diffusers folder as tiny-org/tiny-sd15 (main, tag v1)."""
    root = tmp_path_factory.mktemp("runpod-volume") / "huggingface-cache" / "hub"
    hub_tree(root, tiny_bucket / "tiny-sd15" / "diffusers", refs={"main": COMMIT, "v1": COMMIT})
    read_only(root.parent)
    return root


def settings_for(engine_settings: Settings, tmp_path: Path, uri: str, **changes) -> Settings:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    defaults = yaml.safe_load((REPO_ROOT / "models" / "tiny-sd15.yaml").read_text())["defaults"]  # tiny-sd15's
    (models / "cached.yaml").write_text(yaml.safe_dump({"name": "cached", "architecture": "sd15",
                                                        "format": "diffusers", "uri": uri, "defaults": defaults}))
    return dataclasses.replace(engine_settings, models_dir=models, default_model="cached",
                               cache_dir=tmp_path / "sd-cache", max_batch_images=1, **changes)


@pytest.mark.parametrize("revision", [f"@{COMMIT}", "@main", "@v1", ""])
def test_a_cached_snapshot_loads_and_generates_with_no_download(engine, engine_settings, hub, tmp_path, revision):
    from sd_core.engine import Engine

    settings = settings_for(engine_settings, tmp_path, f"hf://{REPO}{revision}/", hf_model_cache=hub)
    cached = Engine(settings)
    assert set(cached.preload()) >= {"cached"}
    weights = cached.pool.get("cached").local.weights
    assert weights == hub / "models--tiny-org--tiny-sd15" / "snapshots" / COMMIT
    assert not (settings.cache_dir / "hf").exists()  # the hub download path never ran
    # the same weights as tiny-sd15 from the bucket: the same pixels
    same = REQUEST.model_copy(update={"model": "tiny-sd15"})
    assert np.array_equal(pixels(cached.generate(REQUEST)), pixels(engine.generate(same)))


def test_a_missing_snapshot_falls_back_to_the_normal_fetch(engine_settings, hub, tiny_bucket, tmp_path):
    other = "f" * 40
    settings = settings_for(engine_settings, tmp_path, f"hf://{REPO}@{other}/", hf_model_cache=hub)
    # offline and nowhere else: a clear error naming the URI
    with pytest.raises(FetchError) as info:
        storage.fetch(f"hf://{REPO}@{other}/", settings)
    assert str(info.value) == (f"uri: cannot fetch hf://{REPO}@{other}/: the hub is unreachable (or HF_HUB_OFFLINE "
                               "is set) and it is not in the local hub cache")
    # the normal path (huggingface_hub's own cache under SD_CACHE_DIR/hf) has it: loaded from there
    hub_tree(settings.cache_dir / "hf", tiny_bucket / "tiny-sd15" / "diffusers", commit=other, refs={})
    assert storage.fetch(f"hf://{REPO}@{other}/", settings) == (
        settings.cache_dir / "hf" / "models--tiny-org--tiny-sd15" / "snapshots" / other)


def test_an_unknown_branch_is_not_taken_from_the_cache(engine_settings, hub, tmp_path):
    settings = settings_for(engine_settings, tmp_path, f"hf://{REPO}@dev/", hf_model_cache=hub)
    with pytest.raises(FetchError, match="not in the local hub cache"):
        storage.fetch(f"hf://{REPO}@dev/", settings)


def test_single_files_and_subfolders_come_from_the_snapshot_with_their_pins_checked(engine_settings, hub, tmp_path):
    settings = dataclasses.replace(engine_settings, hf_model_cache=hub, cache_dir=tmp_path / "sd-cache")
    snapshot = hub / "models--tiny-org--tiny-sd15" / "snapshots" / COMMIT
    config = snapshot / "unet" / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    assert storage.fetch(f"hf://{REPO}@main/unet/config.json", settings, sha256=digest) == config
    assert storage.fetch(f"hf://{REPO}@main/unet/", settings) == snapshot / "unet"
    with pytest.raises(ChecksumMismatch):
        storage.fetch(f"hf://{REPO}@main/unet/config.json", settings, sha256="0" * 64)


def test_a_dangling_snapshot_link_is_not_a_cached_file(engine_settings, tmp_path, tiny_bucket):
    hub = tmp_path / "hub"
    repo = hub_tree(hub, tiny_bucket / "tiny-sd15" / "diffusers")
    config = repo / "snapshots" / COMMIT / "unet" / "config.json"
    config.resolve().unlink()  # an interrupted download: the link is there, its blob is not
    settings = dataclasses.replace(engine_settings, hf_model_cache=hub, cache_dir=tmp_path / "sd-cache")
    with pytest.raises(FetchError, match="not in the local hub cache"):
        storage.fetch(f"hf://{REPO}@main/unet/config.json", settings)


def test_hf_hub_cache_is_searched_too(engine_settings, hub, tmp_path):
    read = Settings.from_env({"HF_HUB_CACHE": str(hub)})
    assert read.hf_hub_cache == hub and Settings().hf_model_cache == Path("/runpod-volume/huggingface-cache/hub")
    settings = dataclasses.replace(engine_settings, hf_model_cache=tmp_path / "none", hf_hub_cache=hub,
                                   cache_dir=tmp_path / "sd-cache")
    assert storage.fetch(f"hf://{REPO}/", settings) == hub / "models--tiny-org--tiny-sd15" / "snapshots" / COMMIT


def test_the_weights_cache_never_lives_in_the_model_cache(engine_settings, hub):
    settings = dataclasses.replace(engine_settings, hf_model_cache=hub, cache_dir=hub / "sd-cache")
    with pytest.raises(FetchError, match="^SD_CACHE_DIR: the weights cache .* is inside the read-only model cache"):
        WeightsCache.from_settings(settings)


def test_the_model_cache_alone_is_no_network_volume(tmp_path):
    volume = tmp_path / "runpod-volume"
    assert not runpod_network_volume(volume)
    (volume / "huggingface-cache" / "hub").mkdir(parents=True)
    assert not runpod_network_volume(volume)  # RunPod's cached models only: the weights cache stays local
    (volume / "sd-cache").mkdir()
    assert runpod_network_volume(volume)


def test_paths_out_of_the_snapshot_are_refused(engine_settings, hub, tmp_path):
    settings = dataclasses.replace(engine_settings, hf_model_cache=hub, cache_dir=tmp_path / "sd-cache")
    with pytest.raises(FetchError, match="refusing unsafe object path"):
        storage.fetch(f"hf://{REPO}@main/../{COMMIT}/", settings)
    with pytest.raises(FetchError, match="not in the local hub cache"):
        storage.fetch(f"hf://{REPO}@../unet/config.json", settings)
