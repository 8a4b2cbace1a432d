"""End to end: tiny models uploaded with upload_weights.py to SeaweedFS -> fresh cache -> engine -> image; the second
cold start is all cache hits (no request reaches the store)."""

from __future__ import annotations

from pathlib import Path

from scripts.ops import upload_weights
from sd_core.schema import GenerationRequest, LoraSpec
from sd_core.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _upload(argv: list[str]) -> None:
    assert upload_weights.main(argv) == 0


def test_tiny_models_from_s3_to_image_and_cached_second_start(tiny_bucket, s3_env, s3_bucket, s3_proxy, tmp_path):
    from sd_core.engine import Engine

    models = tmp_path / "models"
    sd15 = tiny_bucket / "tiny-sd15"
    dest = f"s3://{s3_bucket}/weights"
    _upload(["model", str(sd15 / "diffusers"), f"{dest}/tiny-sd15/diffusers/", "--name", "e2e-diffusers",
             "--architecture", "sd15", "--models-dir", str(models), "--relative-to", dest])
    _upload(["model", str(sd15 / "tiny-sd15.safetensors"), f"{dest}/tiny-sd15/", "--name", "e2e-single",
             "--architecture", "sd15", "--config", str(sd15 / "config"), "--models-dir", str(models),
             "--relative-to", dest])
    _upload(["lora", str(tiny_bucket / "loras" / "tiny-sd15-peft.safetensors"), f"{dest}/loras/", "--model",
             "e2e-single", "--lora-name", "ink", "--models-dir", str(models), "--relative-to", dest])
    assert "uri: tiny-sd15/tiny-sd15.safetensors" in (models / "e2e-single.yaml").read_text()

    settings = Settings(models_dir=models, weights_uri=dest, cache_dir=tmp_path / "fresh-cache",
                        s3_endpoint_url=s3_proxy.endpoint_url, default_model="e2e-single",
                        preload_models=("e2e-single", "e2e-diffusers"), device="cpu", dtype="float32",
                        fetch_part_mb=0.5)
    requests = [
        GenerationRequest(prompt="a red fox", model="e2e-single", width=64, height=64, num_inference_steps=2,
                          seed=7, loras=[LoraSpec(source="ink", scale=0.8)]),
        GenerationRequest(prompt="a red fox", model="e2e-diffusers", width=64, height=64, num_inference_steps=2,
                          seed=7),
    ]

    def cold_start() -> list[bytes]:
        engine = Engine(settings)
        engine.preload()
        results = [engine.generate(r) for r in requests]
        for result in results:
            image = result.images[0]
            assert image.data.startswith(b"\x89PNG") and (image.width, image.height) == (64, 64)
        return [result.images[0].data for result in results]

    first = cold_start()
    assert s3_proxy.count("GET") > 0
    fetched = s3_proxy.bytes_sent("GET")
    assert fetched >= (sd15 / "tiny-sd15.safetensors").stat().st_size

    s3_proxy.reset()
    second = cold_start()
    assert s3_proxy.requests == []  # every weight, config and LoRA came from the cache
    assert second == first  # same seed, same weights: same images
