"""SD_MODELS_DIR as a storage prefix: manifests listed under s3:// (SeaweedFS) or named by an https:// prefix's
models.txt, read at cold start; relative URIs still join SD_WEIGHTS_URI; the engine lists and generates with them."""

import dataclasses
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from sd_core.errors import ManifestError
from sd_core.manifests import ModelCatalog
from sd_core.schema import GenerationRequest
from sd_core.settings import REPO_ROOT, Settings

FAST = {"prompt": "a harbour", "seed": 5, "num_inference_steps": 2, "width": 64, "height": 64}
LOCAL = sorted(path.name for path in (REPO_ROOT / "models").glob("*.yaml"))


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def test_settings_keep_a_storage_prefix_as_a_uri():
    settings = Settings.from_env({"SD_MODELS_DIR": "s3://bucket/catalog/"})
    assert settings.models_dir == "s3://bucket/catalog/"
    assert Settings.from_env({"SD_MODELS_DIR": "/srv/models"}).models_dir.as_posix() == "/srv/models"


def test_catalog_from_s3_lists_and_generates(engine_settings, engine, s3_env, s3_bucket, tmp_path):
    from sd_core.engine import Engine

    client = s3_env.client()
    for name in LOCAL:
        client.put_object(Bucket=s3_bucket, Key=f"catalog/{name}", Body=(REPO_ROOT / "models" / name).read_bytes())
    client.put_object(Bucket=s3_bucket, Key="catalog/README.md", Body=b"not a manifest")
    client.put_object(Bucket=s3_bucket, Key="catalog/old/broken.yaml", Body=b"name: [")  # sub-folders: not read
    settings = dataclasses.replace(engine_settings, models_dir=f"s3://{s3_bucket}/catalog/",
                                   s3_endpoint_url=s3_env.endpoint_url, cache_dir=tmp_path / "cache")
    remote = Engine(settings)
    assert sorted(remote.catalog.manifests) == sorted(engine.catalog.manifests)
    assert sorted(path.name for path in remote.settings.models_dir.glob("*.yaml")) == LOCAL  # _upscalers, _safety too
    assert remote.upscalers.names() == engine.upscalers.names()
    # relative URIs joined onto SD_WEIGHTS_URI as before: the same model, the same pixels
    assert np.array_equal(pixels(remote.generate(GenerationRequest(model="tiny-sd15", **FAST))),
                          pixels(engine.generate(GenerationRequest(model="tiny-sd15", **FAST))))

    # An operator adds a model by uploading a manifest: the next cold start has it.
    added = (REPO_ROOT / "models" / "tiny-sd15.yaml").read_text().replace("name: tiny-sd15\n", "name: uploaded\n")
    client.put_object(Bucket=s3_bucket, Key="catalog/uploaded.yaml", Body=added.encode())
    assert "uploaded" not in remote.catalog.manifests
    assert "uploaded" in Engine(settings).catalog.manifests


def test_empty_or_unreachable_s3_prefix_is_a_clear_startup_error(engine_settings, s3_env, s3_bucket):
    with pytest.raises(ManifestError, match="no manifests"):
        ModelCatalog.from_dir(f"s3://{s3_bucket}/nothing/", dataclasses.replace(
            engine_settings, s3_endpoint_url=s3_env.endpoint_url))
    with pytest.raises(ManifestError, match="cannot read the model catalog"):
        ModelCatalog.from_dir("s3://no-such-bucket-here/catalog/", dataclasses.replace(
            engine_settings, s3_endpoint_url=s3_env.endpoint_url, fetch_retries=0))


class _Web(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        body = body if body is not None else b"not found"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def web():
    handler = type("Handler", (_Web,), {"files": {}})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.files = handler.files
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_catalog_from_a_web_prefix_reads_its_models_txt(engine_settings, web):
    web.files["/cat/models.txt"] = b"# the catalog\ntiny-sd15.yaml\n\ntiny-sdxl-single.yaml  # an SDXL one\n"
    for name in ("tiny-sd15.yaml", "tiny-sdxl-single.yaml", "tiny-sdxl.yaml"):
        web.files[f"/cat/{name}"] = (REPO_ROOT / "models" / name).read_bytes()
    catalog = ModelCatalog.from_dir(f"{web.url}/cat/", engine_settings)
    assert sorted(catalog.manifests) == ["tiny-sd15", "tiny-sdxl-single"]  # what models.txt names, only
    assert catalog.get("tiny-sd15").uri == "tiny-sd15/diffusers/"  # relative: joined onto SD_WEIGHTS_URI at fetch


@pytest.mark.parametrize(("index", "words"), [
    (None, "models.txt"),
    (b"../secret.yaml\n", "not a plain manifest file name"),
    (b"notes.txt\n", "not a manifest"),
    (b"missing.yaml\n", "object not found"),
])
def test_bad_web_catalog_is_a_clear_startup_error(engine_settings, web, index, words):
    if index is not None:
        web.files["/cat/models.txt"] = index
    with pytest.raises(ManifestError, match=words):
        ModelCatalog.from_dir(f"{web.url}/cat/", dataclasses.replace(engine_settings, fetch_retries=0))
