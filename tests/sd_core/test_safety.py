"""The safety checker (sd_core/safety.py) with the tiny random-weight checkers: one that flags every image, one that
flags none. Engine-level first (blackout, reporting, the all-flagged error, pass-through, per-request opt-out, cold
start), then the platform defaults through the real Cog server and the RunPod worker (one server each)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from sd_core.errors import FetchError, ManifestError, UnsafeCheckpoint
from sd_core.manifests import ModelCatalog
from sd_core.schema import GenerationRequest
from sd_core.settings import REPO_ROOT, Settings

FAST = {"prompt": "a red fox in the snow", "num_inference_steps": 2, "seed": 11}


def write_manifest(folder: Path, variant: str, **extra) -> Path:
    """A safety checker manifest for tiny-safety-checker/<variant>/ (relative: joined onto SD_WEIGHTS_URI)."""
    path = folder / f"_safety_checker-{variant}.yaml"
    path.write_text(json.dumps({"name": f"tiny-{variant}", "uri": f"tiny-safety-checker/{variant}/", **extra}))
    return path


def pixels(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def is_black(image: Image.Image) -> bool:
    return image.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("safety-manifests")
    return {variant: write_manifest(folder, variant) for variant in ("flags", "passes")}


@pytest.fixture(scope="module")
def checking_engines(engine, manifests):
    """Engines with the checker on, sharing the session engine's loaded pipelines: {"flags": ..., "passes": ...}."""
    from sd_core.engine import Engine

    engines = {}
    for variant, manifest in manifests.items():
        settings = dataclasses.replace(engine.settings, safety_checker=True, safety_checker_model=manifest)
        checking = Engine(settings, catalog=engine.catalog)
        checking.denoiser.pool = engine.pool  # the tiny model stays loaded once
        engines[variant] = checking
    return engines


# --- the engine --------------------------------------------------------------------------------------------------
def test_a_checker_that_flags_nothing_leaves_the_images_pixel_for_pixel(engine, checking_engines):
    request = GenerationRequest(**FAST, num_outputs=2)
    plain = engine.generate(request)
    checked = checking_engines["passes"].generate(request)
    assert checked.safety_checked and not plain.safety_checked
    assert [image.nsfw for image in checked.images] == [False, False]
    for a, b in zip(plain.images, checked.images, strict=True):
        assert pixels(a.data).tobytes() == pixels(b.data).tobytes()
        assert not is_black(pixels(a.data))
    print(f"tiny safety checker, 2 images 64x64: {checked.timings['safety_s'] * 1000:.1f} ms")
    assert "safety_s" in checked.timings and "safety_s" not in plain.timings


def test_every_image_flagged_fails_the_request_with_a_clear_message(checking_engines):
    from sd_core.safety import ContentFlagged

    with pytest.raises(ContentFlagged) as info:
        checking_engines["flags"].generate(GenerationRequest(**FAST, num_outputs=2))
    assert str(info.value) == ("NSFW content detected: all 2 image(s) were flagged by the safety checker; try another "
                               "prompt or seed")


def test_flagged_images_are_blacked_out_and_reported_the_others_kept(engine, checking_engines, monkeypatch):
    """The real flagging checker sees only the first image of two: that one comes back black and nsfw."""
    flagging = checking_engines["flags"].safety
    real_check = type(flagging).check

    def first_only(self, images):
        checked, flags = real_check(self, images[:1])
        return checked + images[1:], flags + [False] * (len(images) - 1)

    monkeypatch.setattr(type(flagging), "check", first_only)
    request = GenerationRequest(**FAST, num_outputs=2)
    result = checking_engines["flags"].generate(request)
    plain = engine.generate(request)
    assert [image.nsfw for image in result.images] == [True, False]
    first = pixels(result.images[0].data)
    assert is_black(first) and first.size == (64, 64) and not is_black(pixels(plain.images[0].data))
    assert pixels(result.images[1].data).tobytes() == pixels(plain.images[1].data).tobytes()


def test_the_checker_blacks_out_pil_images_of_any_size(checking_engines):
    images = [Image.new("RGB", (96, 64), (200, 120, 40)), Image.new("RGB", (64, 64), (10, 200, 10))]
    flagged, flags = checking_engines["flags"].safety.check(list(images))
    assert flags == [True, True] and [i.size for i in flagged] == [(96, 64), (64, 64)] and all(map(is_black, flagged))
    kept, flags = checking_engines["passes"].safety.check(list(images))
    assert flags == [False, False] and kept == images


def test_disable_safety_checker_skips_it(engine, checking_engines):
    request = GenerationRequest(**FAST, disable_safety_checker=True)
    result = checking_engines["flags"].generate(request)
    assert not result.safety_checked and [image.nsfw for image in result.images] == [False]
    assert pixels(result.images[0].data).tobytes() == pixels(engine.generate(request).images[0].data).tobytes()


def test_with_the_checker_off_nothing_is_loaded_or_run(engine):
    assert engine.settings.safety_checker is None and engine.safety is None  # sd_core's own default: off
    result = engine.generate(GenerationRequest(**FAST))
    assert not result.safety_checked and result.images[0].nsfw is False


def test_cold_start_loads_the_checker_once(make_engine, manifests):
    engine = make_engine(safety_checker=True, safety_checker_model=manifests["passes"], max_batch_images=1)
    timings = engine.preload()
    assert engine.safety.loaded and "safety_checker" in timings
    model = engine.safety._model
    engine.generate(GenerationRequest(**FAST))
    assert engine.safety._model is model and engine.preload().get("safety_checker") is None


@pytest.mark.parametrize("problem", ["no-manifest", "missing-weights", "pickle-only", "not-safetensors"])
def test_a_checker_that_cannot_be_had_fails_the_cold_start(make_engine, tiny_bucket, tmp_path, problem):
    source = tiny_bucket / "tiny-safety-checker" / "passes"
    folder = tmp_path / "checker"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    if problem == "pickle-only":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    elif problem == "not-safetensors":
        (folder / "model.safetensors").write_bytes(b"\x80\x04 a pickle under the safetensors name")
    manifest = tmp_path / "_safety_checker.yaml"
    if problem == "missing-weights":
        manifest.write_text(json.dumps({"name": "gone", "uri": str(tmp_path / "nowhere") + "/",
                                        "files": {"model.safetensors": "0" * 64}}))
    elif problem != "no-manifest":
        manifest.write_text(json.dumps({"name": "broken", "uri": str(folder) + "/"}))
    engine = make_engine(safety_checker=True, safety_checker_model=manifest)
    expected = {"no-manifest": ManifestError, "missing-weights": FetchError, "pickle-only": ManifestError,
                "not-safetensors": UnsafeCheckpoint}[problem]
    with pytest.raises(expected) as info:
        engine.preload()
    message = str(info.value)
    if problem == "no-manifest":
        assert "does not exist" in message and "SD_SAFETY_CHECKER=off" in message, message
    elif problem == "pickle-only":
        assert "no model.safetensors" in message and "SD_ALLOW_PICKLE" in message, message
    assert "Traceback" not in message


def test_settings_read_sd_safety_checker_and_adapters_fill_their_default(tmp_path):
    assert Settings.from_env({}).safety_checker is None
    assert Settings.from_env({"SD_SAFETY_CHECKER": "on"}).safety_checker is True
    assert Settings.from_env({"SD_SAFETY_CHECKER": "off"}).safety_checker is False
    with pytest.raises(ValueError, match="SD_SAFETY_CHECKER: expected on or off"):
        Settings.from_env({"SD_SAFETY_CHECKER": "maybe"})
    assert Settings.from_env({"SD_SAFETY_CHECKER_MODEL": str(tmp_path / "x.yaml")}).safety_checker_model == (
        tmp_path / "x.yaml")
    assert Settings.from_env({}).with_platform_defaults(safety_checker=True).safety_checker is True
    off = Settings.from_env({"SD_SAFETY_CHECKER": "off"})
    assert off.with_platform_defaults(safety_checker=True).safety_checker is False


def test_the_checker_manifest_is_not_a_model():
    catalog = ModelCatalog.from_dir(REPO_ROOT / "models")
    assert "tiny-safety-checker" not in catalog.manifests and "tiny-sd15" in catalog.manifests
    from sd_core.safety import load_manifest

    assert load_manifest(REPO_ROOT / "models" / "_safety_checker.yaml").uri == "tiny-safety-checker/passes/"


def test_a1111_info_reports_nsfw_per_image():
    from sd_core import a1111
    from sd_core.schema import GeneratedImage, GenerationResult

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG")
    images = [GeneratedImage(buffer.getvalue(), "image/png", "png", seed, 64, 64, nsfw=seed == 1) for seed in (1, 2)]
    call = a1111.parse_call({"prompt": "x", "steps": 2, "batch_size": 2})
    result = GenerationResult(images=images, seeds=[1, 2], model="tiny-sd15", parameters="x", safety_checked=True,
                              request=a1111.to_request(call))
    response = a1111.to_response(call, result, ["a", "b"])
    assert json.loads(response["info"])["nsfw"] == [True, False]


# --- the adapters' defaults, on the real servers ------------------------------------------------------------------
def test_cog_with_a_flagging_checker_fails_the_prediction_and_disable_skips_it(
    cog_server_factory, runpod_weights_env, manifests, tmp_path
):
    # COG_MAX_CONCURRENCY=2: with one slot, coglet can answer 409 to a prediction sent right after another.
    server = cog_server_factory({**runpod_weights_env, "SD_SAFETY_CHECKER_MODEL": str(manifests["flags"]),
                                 "SD_CACHE_DIR": str(tmp_path / "cache"), "COG_MAX_CONCURRENCY": "2"})
    body, _ = server.wait_for_status("READY", "SETUP_FAILED", timeout=240)
    assert body["status"] == "READY", body
    failed = server.predict(FAST)  # no SD_SAFETY_CHECKER: Cog's default, on
    assert failed["status"] == "failed", failed
    assert "all 1 image(s) were flagged by the safety checker" in failed["error"], failed["error"]
    assert "Traceback" not in failed["error"]
    skipped = server.predict({**FAST, "disable_safety_checker": True})
    assert skipped["status"] == "succeeded", skipped.get("error")
    assert "has_nsfw_concepts" not in skipped["metrics"]


def test_runpod_with_sd_safety_checker_on_flags_native_and_a1111_jobs(runpod_server_factory, runpod_weights_env,
                                                                     manifests):
    server = runpod_server_factory({**runpod_weights_env, "SD_SAFETY_CHECKER": "on",
                                    "SD_SAFETY_CHECKER_MODEL": str(manifests["flags"])})
    assert "safety checker tiny-flags loaded" in server.log_text()
    job = server.runsync({**FAST, "num_outputs": 2})
    assert job["status"] == "FAILED" and "all 2 image(s) were flagged" in job["error"], job
    a1111 = server.runsync({"prompt": "a fox", "steps": 2, "seed": 3})
    assert a1111["status"] == "FAILED" and "flagged by the safety checker" in a1111["error"], a1111
    skipped = server.runsync({**FAST, "disable_safety_checker": True})
    assert skipped["status"] == "COMPLETED", skipped
    assert [entry["nsfw"] for entry in skipped["output"]["images"]] == [False]
    assert not is_black(pixels(base64.b64decode(skipped["output"]["images"][0]["image"])))
