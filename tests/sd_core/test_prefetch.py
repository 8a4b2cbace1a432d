"""Cold start: the adapters start the preloaded models' downloads (sd_core/prefetch.py) before torch is imported, and
Engine.preload takes those downloads over (no second fetch), with the same pixels as a preload that fetches itself."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd_core.schema import GenerationRequest

ROOT = Path(__file__).resolve().parents[2]
REQUEST = GenerationRequest(prompt="a red fox", model="tiny-sd15", width=64, height=64, num_inference_steps=2, seed=7)


def test_preload_takes_over_the_prefetched_download_with_the_same_pixels(engine_settings, tmp_path, monkeypatch):
    import sd_core.prefetch
    from sd_core.engine import Engine
    from sd_core.prefetch import Prefetch

    def fetch_again(*args, **kwargs):
        raise AssertionError("preload fetched a model the prefetch was downloading")

    settings = dataclasses.replace(engine_settings, cache_dir=tmp_path / "cache", preload_models=("tiny-sd15",),
                                   warmup=False)
    prefetch = Prefetch(settings)
    with monkeypatch.context() as patch:
        patch.setattr(sd_core.prefetch, "fetch_model", fetch_again)  # (preload's own downloads start there too)
        engine = Engine(prefetch.settings)
        engine.preload(prefetch)
    assert prefetch.take("tiny-sd15") is None  # taken by preload
    prefetched = engine.generate(REQUEST).images[0].data

    plain = Engine(dataclasses.replace(settings, cache_dir=tmp_path / "other-cache"))
    plain.preload()
    assert prefetched == plain.generate(REQUEST).images[0].data  # same PNG bytes


def test_an_unknown_preloaded_model_fails_at_prefetch(engine_settings):
    from sd_core.errors import SDError
    from sd_core.prefetch import Prefetch

    with pytest.raises(SDError):
        Prefetch(dataclasses.replace(engine_settings, preload_models=("no-such-model",)))


PROBE = """
import json, sys
import sd_core.prefetch as prefetch
seen = {}
class Spy(prefetch.Prefetch):
    def __init__(self, settings):
        seen["torch_imported_before_the_downloads"] = "torch" in sys.modules
        super().__init__(settings)
        seen["downloads"] = list(self._started)
import handler
handler.Prefetch = Spy
from sd_core.settings import Settings
worker = handler.Worker(Settings.from_env())
seen["unhealthy"] = worker.unhealthy
seen["loaded"] = worker.engine.pool.loaded
print(json.dumps(seen))
"""


def test_the_runpod_worker_starts_the_downloads_before_importing_torch(engine_settings, tmp_path):
    env = {**os.environ, "SD_MODELS_DIR": str(engine_settings.models_dir),
           "SD_WEIGHTS_URI": engine_settings.weights_uri,
           "SD_CACHE_DIR": str(tmp_path / "cache"), "SD_DEVICE": "cpu", "SD_DTYPE": "float32",
           "SD_PRELOAD_MODELS": "tiny-sd15", "SD_WARMUP": "0", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"torch_imported_before_the_downloads": False, "downloads": ["tiny-sd15"], "unhealthy": None,
                    "loaded": ["tiny-sd15"]}
