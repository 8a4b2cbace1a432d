"""Cold-start overlap (SD_OVERLAP_LOAD) and the GPU load path settings (SD_LOAD_TO_DEVICE, SD_COMPILE_CACHE_DIR):
a folder model's components load while its UNet still downloads, with the same pixels as the folder loaded at once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from scripts.ops import upload_weights
from sd_core.schema import GenerationRequest
from sd_core.settings import Settings

REQUEST = GenerationRequest(prompt="a red fox", model="ov-diffusers", width=64, height=64, num_inference_steps=2,
                            seed=7)


@pytest.fixture(scope="module")
def uploaded(tiny_bucket, s3_server, tmp_path_factory) -> tuple[Path, str]:
    """The tiny SD1.5 diffusers folder in SeaweedFS under a manifest `ov-diffusers`: (models dir, weights URI)."""
    s3_bucket = s3_server.make_bucket()
    models = tmp_path_factory.mktemp("ov-models")
    dest = f"s3://{s3_bucket}/weights"
    env = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)
    try:
        assert upload_weights.main(["model", str(tiny_bucket / "tiny-sd15" / "diffusers"), f"{dest}/ov/diffusers/",
                                    "--name", "ov-diffusers", "--architecture", "sd15", "--models-dir", str(models),
                                    "--relative-to", dest]) == 0
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return models, dest


def cold_start(uploaded, endpoint: str, cache: Path, **changes) -> bytes:
    from sd_core.engine import Engine

    models, dest = uploaded
    settings = Settings(models_dir=models, weights_uri=dest, cache_dir=cache, s3_endpoint_url=endpoint,
                        default_model="ov-diffusers", preload_models=("ov-diffusers",), device="cpu",
                        dtype="float32", fetch_part_mb=0.25, fetch_retries=3, fetch_timeout_s=5.0, warmup=False,
                        **changes)
    engine = Engine(settings)
    engine.preload()
    return engine.generate(REQUEST).images[0].data


def test_components_load_while_the_unet_downloads_with_the_same_pixels(uploaded, s3_env, s3_fault_proxy, tmp_path,
                                                                       caplog):
    # the UNet's first ranged GET stalls for 3 s: the text encoder and VAE have landed and must load meanwhile
    s3_fault_proxy.stall_s = 3.0
    s3_fault_proxy.configure(schedule=["stall"], path_pattern=r"/unet/.*safetensors")
    with caplog.at_level(logging.INFO, logger="sd_core.pipelines"):
        overlapped = cold_start(uploaded, s3_fault_proxy.url, tmp_path / "cache-a", overlap_load=True)
    assert s3_fault_proxy.counters["stall"] == 1
    early = {r.getMessage().split()[2]: r.getMessage().rpartition("still downloading: ")[2]
             for r in caplog.records if "while the download runs" in r.getMessage()}
    assert "unet" in early["text_encoder"] and "unet" in early["vae"]  # loaded before the UNet had landed

    s3_fault_proxy.configure(schedule=[], path_pattern=None)
    at_once = cold_start(uploaded, s3_fault_proxy.url, tmp_path / "cache-b", overlap_load=False)
    assert overlapped == at_once  # same PNG bytes: same pixels, same infotext


def test_load_to_device_gives_the_same_pixels(uploaded, s3_env, s3_server, tmp_path):
    from sd_core.device import choose_placement
    from sd_core.manifests import ModelCatalog
    from sd_core.pipelines import load_options

    settings = Settings(models_dir=uploaded[0], device="cpu", dtype="float32", load_to_device=True)
    manifest = ModelCatalog.from_settings(settings).get("ov-diffusers")
    assert load_options(manifest, settings, choose_placement(settings))["device_map"] == "cpu"
    off = Settings(models_dir=uploaded[0], device="cpu", dtype="float32")
    assert "device_map" not in load_options(manifest, off, choose_placement(off))

    direct = cold_start(uploaded, s3_server.endpoint_url, tmp_path / "cache", load_to_device=True)
    plain = cold_start(uploaded, s3_server.endpoint_url, tmp_path / "cache", load_to_device=False)  # cache hit
    assert direct == plain


def test_the_commit_waits_for_a_load_reading_the_staging_folder(tmp_path):
    import threading

    from sd_core.component_loading import MODEL_INDEX, Arrivals

    arrivals = Arrivals()
    arrivals.listing(tmp_path, [MODEL_INDEX, "vae/config.json", "vae/w.safetensors", "unet/w.safetensors"])
    for rel in (MODEL_INDEX, "vae/config.json"):
        arrivals.arrived(rel)
    assert arrivals.complete() == set()  # the VAE's weights have not landed
    arrivals.arrived("vae/w.safetensors")
    assert arrivals.complete() == {"vae"} and arrivals.pending() == ["unet"]
    committed = threading.Event()
    with arrivals.reading() as root:
        assert root == tmp_path
        committer = threading.Thread(target=lambda: (arrivals.committing(), committed.set()))
        committer.start()
        assert not committed.wait(0.3)  # the rename waits for the reader
    committer.join(5)
    assert committed.is_set()
    with arrivals.reading() as root:
        assert root is None  # after the commit no load reads the staging folder
    assert arrivals.complete() == set()
