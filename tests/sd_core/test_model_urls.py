"""`model` as the URL of a .safetensors checkpoint: the architecture from its header (ranged reads), the config of the
catalog's single-file model, the user-URL policy, the cache, pickle and non-checkpoint files refused, the switch."""

import dataclasses
import functools
import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.errors import InvalidRequest
from sd_core.model_urls import url_label
from sd_core.schema import GenerationRequest
from tests.fixtures.http_files import FileHandler, serving

FAST = {"prompt": "a lighthouse at dusk", "seed": 3, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64,
        "height": 64, "scheduler": "Euler"}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


class _Files(FileHandler):
    """Serves `files` with HTTP Range support and records (path, Range header, body bytes sent) per request."""

    files: dict[str, bytes] = {}
    seen: list[tuple[str, str | None, int]] = []

    def do_GET(self):
        body = self.files.get(self.path.split("?", 1)[0])
        if body is None:
            self.send_body(404, b"not found")
        else:
            self.send_file(body)

    def end_headers(self):
        self.send_header("ETag", '"v1"')
        super().end_headers()

    def write_body(self, body: bytes):
        super().write_body(body)  # the header probe closes early when Range is ignored
        self.seen.append((self.path, self.headers.get("Range", "").removeprefix("bytes=") or None, len(body)))


@pytest.fixture(scope="module")
def server(tiny_bucket):
    handler = type("Handler", (_Files,), {"files": {}, "seen": []})
    handler.files.update({
        "/tiny-sd15.safetensors": (tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors").read_bytes(),
        "/tiny-sdxl.safetensors": (tiny_bucket / "tiny-sdxl" / "tiny-sdxl.safetensors").read_bytes(),
        "/lora.safetensors": (tiny_bucket / "loras" / "tiny-sd15-peft.safetensors").read_bytes(),
        "/api/download/models/42": (tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors").read_bytes(),
        "/model.ckpt": b"\x80\x04pickle",
        "/notes.safetensors": b"just some text, not a safetensors file",
    })
    with serving(handler) as httpd:
        httpd.seen = handler.seen
        httpd.files = handler.files
        yield httpd


@pytest.fixture(scope="module")
def url_settings(engine_settings, tmp_path_factory):
    return dataclasses.replace(engine_settings, url_allowed_hosts=("127.0.0.1",),
                               cache_dir=tmp_path_factory.mktemp("url-cache"))


@pytest.fixture(scope="module")
def url_engine(url_settings):
    from sd_core.engine import Engine

    return Engine(url_settings)


def served(server, path: str) -> int:
    return sum(sent for seen_path, _, sent in server.seen if seen_path.split("?", 1)[0] == path)


@functools.cache
def bare_image(tiny_bucket) -> np.ndarray:
    """The same generation through bare diffusers' from_single_file (with the config folder, no hub)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors"), config=str(tiny_bucket / "tiny-sd15" / "config"),
        local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    with torch.inference_mode():
        image = pipe(prompt=FAST["prompt"], num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                     output_type="pil", generator=torch.Generator("cpu").manual_seed(3)).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_url_model_equals_the_manifest_model_and_bare_diffusers_and_is_cached(
        url_engine, url_settings, engine, server, tiny_bucket):
    url = f"{server.url}/tiny-sd15.safetensors?X-Amz-Signature=secret"
    size = len(server.files["/tiny-sd15.safetensors"])
    result = url_engine.generate(GenerationRequest(model=url, **FAST))
    assert result.model == url_label(url) and result.model.startswith("url-")
    assert "secret" not in result.parameters and "127.0.0.1" not in result.parameters
    assert f"Model: {result.model}" in result.parameters
    manifest = engine.generate(GenerationRequest(model="tiny-sd15-single", **FAST))
    assert np.array_equal(pixels(result), pixels(manifest))
    assert np.array_equal(pixels(result), bare_image(tiny_bucket))
    first = served(server, "/tiny-sd15.safetensors")
    assert size <= first < 2 * size  # the file once, plus the header probe and the size probe
    # The header probe read the first bytes only, with Range.
    assert any(ranged == "0-1048575" for path, ranged, _ in server.seen
               if path.startswith("/tiny-sd15.safetensors"))

    # A second request: the loaded model, nothing fetched. A fresh engine on the same cache: the header again, no file.
    again = url_engine.generate(GenerationRequest(model=url, **FAST))
    assert np.array_equal(pixels(again), pixels(result))
    assert served(server, "/tiny-sd15.safetensors") == first
    from sd_core.engine import Engine

    fresh = Engine(url_settings).generate(GenerationRequest(model=url, **FAST))
    assert np.array_equal(pixels(fresh), pixels(result))
    assert served(server, "/tiny-sd15.safetensors") - first <= 1024 * 1024  # the header probe only


def test_sdxl_single_file_is_detected_as_sdxl(url_engine, server):
    manifest = url_engine.model_urls.resolve(f"{server.url}/tiny-sdxl.safetensors")
    assert manifest.architecture == "sdxl" and manifest.config_uri.endswith("tiny-sdxl/config/")
    assert manifest.defaults.guidance_scale == 5.0  # the catalog's single-file SDXL model's defaults
    before = served(server, "/tiny-sdxl.safetensors")
    assert before < len(server.files["/tiny-sdxl.safetensors"])  # the header only, not the file
    result = url_engine.generate(GenerationRequest(model=f"{server.url}/tiny-sdxl.safetensors", prompt="a cat"))
    assert result.images and result.request.width == 64


def test_a_url_without_the_suffix_is_loaded_as_safetensors(url_engine, server):
    # diffusers picks its loader by the file's suffix: anything but .safetensors would be unpickled
    manifest = url_engine.model_urls.resolve(f"{server.url}/api/download/models/42")
    local = url_engine.model_urls.fetch(manifest)
    assert local.weights.name.endswith(".safetensors") and local.weights.read_bytes() == server.files[
        "/api/download/models/42"]


@pytest.mark.parametrize(("path", "words"), [
    ("/model.ckpt", "pickle checkpoints"),
    ("/lora.safetensors", "not a Stable Diffusion checkpoint"),
    ("/notes.safetensors", "not a .safetensors checkpoint"),
    ("/missing.safetensors", "HTTP 404"),
])
def test_bad_model_urls_are_refused_clearly(url_engine, server, path, words):
    with pytest.raises(InvalidRequest, match=words) as caught:
        url_engine.generate(GenerationRequest(model=f"{server.url}{path}?token=hush", **FAST))
    assert str(caught.value).startswith("model: ") and "hush" not in str(caught.value)
    if path == "/model.ckpt":
        assert not any(seen_path.startswith("/model.ckpt") for seen_path, _, _ in server.seen)  # never fetched


def test_the_url_policy_applies(engine, server):
    # Without SD_URL_ALLOWED_HOSTS: http:// and loopback are refused before anything is fetched.
    count = len(server.seen)
    with pytest.raises(InvalidRequest, match="SD_URL_ALLOWED_HOSTS"):
        engine.generate(GenerationRequest(model=f"{server.url}/tiny-sd15.safetensors", **FAST))
    for url, words in [("https://127.0.0.1/x.safetensors", "loopback"), ("file:///etc/passwd", "file://"),
                       ("https://user:pw@example.com/x.safetensors", "credentials"),
                       ("ftp://example.com/x.safetensors", "scheme")]:
        with pytest.raises(InvalidRequest, match=words):
            engine.generate(GenerationRequest(model=url, **FAST))
    assert len(server.seen) == count


def test_size_limit_of_its_own(url_settings, server):
    from sd_core.engine import Engine

    small = Engine(dataclasses.replace(url_settings, max_model_url_bytes=1000))
    with pytest.raises(InvalidRequest, match=r"larger than the limit of 1000 bytes \(SD_MAX_MODEL_URL_BYTES\)"):
        small.generate(GenerationRequest(model=f"{server.url}/tiny-sd15.safetensors", **FAST))
    assert url_settings.max_model_url_bytes >= 24 * 10**9 and url_settings.url_max_bytes < 24 * 10**9


def test_operators_can_turn_model_urls_off(url_settings, server):
    from sd_core.engine import Engine

    off = Engine(dataclasses.replace(url_settings, allow_model_urls=False))
    with pytest.raises(InvalidRequest, match="SD_ALLOW_MODEL_URLS"):
        off.generate(GenerationRequest(model=f"{server.url}/tiny-sd15.safetensors", **FAST))


def test_schema_bounds_names_and_urls_separately():
    GenerationRequest(model="https://example.com/" + "a" * 1900 + ".safetensors")
    with pytest.raises(ValueError, match="at most 200 characters"):
        GenerationRequest(model="n" * 201)
    with pytest.raises(ValueError):
        GenerationRequest(model="https://example.com/" + "a" * 2100)


def test_a1111_checkpoint_override_takes_names_only():
    with pytest.raises(InvalidRequest, match="not a URL") as caught:
        a1111.to_request(a1111.A1111Call("txt2img", {"prompt": "x", "override_settings": {
            "sd_model_checkpoint": "https://example.com/m.safetensors?sig=abc"}}))
    assert "sig=abc" not in str(caught.value)


def test_s3_url_is_detected_from_a_ranged_read_of_its_header(url_settings, s3_env, s3_bucket, s3_proxy, tiny_bucket):
    from sd_core.manifests import ModelCatalog
    from sd_core.model_urls import ModelUrls

    body = (tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors").read_bytes()
    s3_env.client().put_object(Bucket=s3_bucket, Key="ckpt/model.safetensors", Body=body)
    settings = dataclasses.replace(url_settings, s3_endpoint_url=s3_proxy.endpoint_url, user_s3_buckets=(s3_bucket,))
    urls = ModelUrls(ModelCatalog.from_dir(settings.models_dir), settings)
    with pytest.raises(InvalidRequest, match="^model: .*SD_USER_S3_BUCKETS"):  # not on the allow-list: never read
        ModelUrls(urls.catalog, url_settings).resolve(f"s3://{s3_bucket}/ckpt/model.safetensors")
    assert s3_proxy.requests == []
    manifest = urls.resolve(f"s3://{s3_bucket}/ckpt/model.safetensors")
    assert manifest.architecture == "sd15" and manifest.name.startswith("url-")
    assert 0 < s3_proxy.bytes_sent("GET") < len(body) // 4  # the header, not the file
    assert urls.fetch(manifest).weights.read_bytes() == body
