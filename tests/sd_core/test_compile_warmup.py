"""SD_TORCH_COMPILE at cold start: the compile cache folder (SD_COMPILE_CACHE_DIR) and a warm-up at the model's
default size, so the compile happens in the cold start and the next worker reuses its kernels."""

from __future__ import annotations

import os

from sd_core.device import optimize
from sd_core.settings import Settings


def test_compile_cache_dir_is_where_inductor_and_triton_cache(make_engine, tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    engine = make_engine()
    model = engine.pool.get("tiny-sd15")
    pipe = model.pipeline("txt2img")
    unet = pipe.unet
    settings = Settings(torch_compile=True, compile_cache_dir=tmp_path / "compile-cache")
    try:
        optimize(pipe, settings, engine.placement)  # wraps the UNet (lazy: compiles on the first call)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile-cache" / "inductor")
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "compile-cache" / "triton")
        assert (tmp_path / "compile-cache").is_dir()
    finally:
        pipe.unet = unet
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/operator/own")  # the operator's own choice is kept
    optimize(pipe, settings, engine.placement)
    pipe.unet = unet
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/operator/own"
    assert Settings.from_env({"SD_COMPILE_CACHE_DIR": str(tmp_path)}).compile_cache_dir == tmp_path


def test_with_torch_compile_the_warmup_runs_at_the_default_size(make_engine):
    plain, compiled = make_engine(), make_engine(torch_compile=True)
    tiny = plain.catalog.get("tiny-sd15")
    manifest = tiny.model_copy(update={"defaults": tiny.defaults.model_copy(update={"width": 128, "height": 96})})
    small = plain.warmup.request(manifest, ["tiny-sd15"])
    assert (small.width, small.height) == (64, 64)
    request = compiled.warmup.request(manifest, ["tiny-sd15"])
    assert (request.width, request.height) == (128, 96)
    assert request.num_inference_steps == 1
