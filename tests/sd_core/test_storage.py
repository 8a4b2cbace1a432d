"""Weights fetching against a real SeaweedFS: upload -> fetch -> cache hit, checksums, errors, resume, locking, LRU."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_core.errors import ChecksumMismatch, FetchError
from sd_core.manifests import fetch_model, load_manifest
from sd_core.settings import Settings
from sd_core.storage import fetch, parse_uri, redact
from sd_core.storage.cache import WeightsCache, content_key

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def _script(name: str):
    return importlib.import_module(f"scripts.ops.{name}")


def settings_for(tmp_path: Path, endpoint: str | None, **overrides) -> Settings:
    values = dict(cache_dir=tmp_path / "cache", s3_endpoint_url=endpoint, fetch_part_mb=0.25, fetch_concurrency=4,
                  fetch_retries=1, fetch_timeout_s=10.0, cache_max_gb=10.0, models_dir=tmp_path / "models")
    values.update(overrides)
    return Settings(**values)


def put(s3_server, bucket: str, key: str, data: bytes) -> str:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fetch_in_subprocess(uri: str, env: dict, sha256: str | None = None, **kwargs) -> subprocess.Popen:
    code = ("import logging, sys\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from sd_core.settings import Settings\n"
            "from sd_core.storage import fetch\n"
            f"print(fetch({uri!r}, Settings.from_env(), sha256={sha256!r}))\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# URIs
# ----------------------------------------------------------------------------------------------------------------
def test_parse_uri_forms():
    loc = parse_uri("s3://bucket/a/b.safetensors")
    assert (loc.scheme, loc.host, loc.path, loc.is_prefix, loc.name) == ("s3", "bucket", "a/b.safetensors", False,
                                                                         "b.safetensors")
    assert parse_uri("s3://bucket/a/").is_prefix
    hf = parse_uri("hf://org/repo@v1.0/unet/model.safetensors")
    assert (hf.host, hf.revision, hf.path, hf.is_prefix) == ("org/repo", "v1.0", "unet/model.safetensors", False)
    assert parse_uri("hf://org/repo").is_prefix
    assert parse_uri("/tmp/x.safetensors").scheme == "file"
    assert parse_uri("file:///tmp/x.safetensors").path == "/tmp/x.safetensors"
    with pytest.raises(FetchError, match="unsupported URI scheme 'ftp'"):
        parse_uri("ftp://host/x")
    with pytest.raises(FetchError, match="no bucket"):
        parse_uri("s3:///key")


def test_hf_uris_fail_clearly_offline(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: the hub path must give a clear error, never a download or a hang
    for uri in ("hf://org/repo/unet/model.safetensors", "hf://org/repo@main/sub/"):
        with pytest.raises(FetchError, match=f"cannot fetch {uri}: the hub is unreachable"):
            fetch(uri, settings_for(tmp_path, None))


def test_redact_hides_signatures_and_passwords():
    url = "https://user:pw@host.example/b/k.safetensors?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA"
    shown = redact(url)
    assert "deadbeef" not in shown and "pw" not in shown and "AKIA" not in shown
    assert shown.startswith("https://***@host.example/b/k.safetensors")


def test_local_paths_are_returned_as_they_are_and_verified(tmp_path):
    data = os.urandom(1000)
    f = tmp_path / "w.safetensors"
    f.write_bytes(data)
    settings = settings_for(tmp_path, None)
    assert fetch(str(f), settings, sha256=sha(data)) == f
    assert fetch(f"file://{f}", settings, sha256=sha(data)) == f
    with pytest.raises(ChecksumMismatch, match="w.safetensors"):
        fetch(str(f), settings, sha256="0" * 64)
    with pytest.raises(FetchError, match="not found: .*missing.bin"):
        fetch(str(tmp_path / "missing.bin"), settings)
    assert fetch(str(tmp_path) + "/", settings, files={"w.safetensors": sha(data)}) == tmp_path
    with pytest.raises(ChecksumMismatch, match="w.safetensors"):
        fetch(str(tmp_path) + "/", settings, files={"w.safetensors": "1" * 64})
    assert not (tmp_path / "cache").exists()  # local weights are never copied


# ----------------------------------------------------------------------------------------------------------------
# Upload -> fetch -> cache hit
# ----------------------------------------------------------------------------------------------------------------
def _fake_diffusers(root: Path) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(int(1.3 * MiB)))
    (root / "text_encoder" / "config.json").write_text("{}")
    (root / "empty.txt").write_bytes(b"")
    return root


def test_upload_then_fetch_then_cache_hit_without_get(s3_env, s3_bucket, s3_proxy, tmp_path, monkeypatch):
    models = tmp_path / "models"
    folder = _fake_diffusers(tmp_path / "src" / "diffusers")
    ckpt = tmp_path / "src" / "tiny.safetensors"
    ckpt.write_bytes(os.urandom(int(1.1 * MiB)))
    config = tmp_path / "src" / "config"
    (config / "unet").mkdir(parents=True)
    (config / "unet" / "config.json").write_text('{"sample_size": 8}')
    lora = tmp_path / "src" / "ink.safetensors"
    lora.write_bytes(os.urandom(300_000))

    # the diffusers folder through the real CLI
    done = subprocess.run([sys.executable, "scripts/ops/upload_weights.py", "model", str(folder),
                           f"s3://{s3_bucket}/m/diffusers/", "--name", "m-diff", "--architecture", "sd15",
                           "--models-dir", str(models)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"]["unet/diffusion_pytorch_model.safetensors"] == \
        sha((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    # a single file + its config folder, and a LoRA of it, in-process
    upload = _script("upload_weights")
    assert upload.main(["model", str(ckpt), f"s3://{s3_bucket}/m/single/", "--name", "m-single", "--architecture",
                        "sd15", "--config", str(config), "--models-dir", str(models)]) == 0
    assert upload.main(["lora", str(lora), f"s3://{s3_bucket}/loras/", "--model", "m-single", "--scale", "0.7",
                        "--models-dir", str(models)]) == 0

    diff = load_manifest(models / "m-diff.yaml")
    single = load_manifest(models / "m-single.yaml")
    assert diff.format == "diffusers" and diff.uri == f"s3://{s3_bucket}/m/diffusers/"
    assert set(diff.files) == set(tree_bytes(folder))
    assert single.format == "single_file" and single.sha256 == sha(ckpt.read_bytes())
    assert single.config_uri == f"s3://{s3_bucket}/m/single/config/"
    assert [(x.name, x.sha256, x.scale) for x in single.loras] == [("ink", sha(lora.read_bytes()), 0.7)]

    settings = settings_for(tmp_path, s3_proxy.endpoint_url)
    local = fetch_model(diff, settings)
    assert tree_bytes(local.weights) == tree_bytes(folder)
    local_single = fetch_model(single, settings)
    assert local_single.weights.read_bytes() == ckpt.read_bytes()
    assert local_single.weights.name == "tiny.safetensors"
    assert tree_bytes(local_single.config) == tree_bytes(config)
    assert s3_proxy.count("GET") > 0

    # second start: every file is a cache hit, not one request reaches the store
    s3_proxy.reset()
    assert fetch_model(diff, settings).weights == local.weights
    assert fetch_model(single, settings).weights == local_single.weights
    assert s3_proxy.requests == []

    # warm_cache.py uses the same path: LoRA fetched once, then hits
    monkeypatch.setenv("SD_MODELS_DIR", str(models))
    monkeypatch.setenv("SD_CACHE_DIR", str(settings.cache_dir))
    monkeypatch.setenv("SD_S3_ENDPOINT_URL", s3_proxy.endpoint_url)
    assert _script("warm_cache").main(["m-diff", "m-single"]) == 0
    assert s3_proxy.count("GET") == 1 and s3_proxy.bytes_sent("GET") == lora.stat().st_size
    s3_proxy.reset()
    assert _script("warm_cache").main(["m-single"]) == 0
    assert s3_proxy.requests == []


def test_cache_hit_optional_head(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path):
    data = os.urandom(700_000)
    uri = put(s3_server, s3_bucket, "w/a.bin", data)
    settings = settings_for(tmp_path, s3_proxy.endpoint_url, cache_head_on_hit=True)
    first = fetch(uri, settings)
    s3_proxy.reset()
    assert fetch(uri, settings) == first
    assert (s3_proxy.count("HEAD"), s3_proxy.count("GET")) == (1, 0)
    # the object changes in the store: the HEAD notices and the new bytes are fetched
    new = os.urandom(500_000)
    put(s3_server, s3_bucket, "w/a.bin", new)
    assert fetch(uri, settings).read_bytes() == new
    # pinned by sha256: never revalidated, no request at all
    s3_proxy.reset()
    pinned = fetch(uri, settings, sha256=sha(new))
    s3_proxy.reset()
    assert fetch(uri, settings, sha256=sha(new)) == pinned
    assert s3_proxy.requests == []


# ----------------------------------------------------------------------------------------------------------------
# Verification and errors
# ----------------------------------------------------------------------------------------------------------------
def test_sha256_mismatch_refetches_once_then_fails_clearly(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path):
    data = os.urandom(600_000)
    uri = put(s3_server, s3_bucket, "bad/model.safetensors", data)
    settings = settings_for(tmp_path, s3_proxy.endpoint_url)
    wrong = "ab" * 32
    with pytest.raises(ChecksumMismatch) as info:
        fetch(uri, settings, sha256=wrong)
    message = str(info.value)
    assert uri in message and wrong in message and sha(data) in message
    assert s3_proxy.bytes_sent("GET") == 2 * len(data)  # fetched, deleted, fetched once more
    cache = WeightsCache(settings.cache_dir)
    assert cache.lookup(content_key(wrong)) is None
    leftovers = [p for p in settings.cache_dir.rglob("*") if p.is_file() and not p.name.endswith((".lock", ".json"))]
    assert leftovers == []  # no bytes anywhere, let alone under a final name
    # the right checksum then succeeds
    assert fetch(uri, settings, sha256=sha(data)).read_bytes() == data


def test_folder_pins_are_verified(s3_server, s3_env, s3_bucket, tmp_path):
    a, b = os.urandom(1000), os.urandom(2000)
    put(s3_server, s3_bucket, "pins/a.bin", a)
    put(s3_server, s3_bucket, "pins/sub/b.bin", b)
    settings = settings_for(tmp_path, s3_server.endpoint_url)
    folder = fetch(f"s3://{s3_bucket}/pins/", settings, files={"a.bin": sha(a), "sub/b.bin": sha(b)})
    assert tree_bytes(folder) == {"a.bin": a, "sub/b.bin": b}
    with pytest.raises(ChecksumMismatch, match=f"s3://{s3_bucket}/pins/sub/b.bin"):
        fetch(f"s3://{s3_bucket}/pins/", settings, files={"a.bin": sha(a), "sub/b.bin": "0" * 64})
    with pytest.raises(FetchError, match="pinned files missing .*c.bin"):
        fetch(f"s3://{s3_bucket}/pins/", settings, files={"c.bin": sha(a)})


def test_missing_objects_are_named(s3_env, s3_bucket, tmp_path):
    settings = settings_for(tmp_path, s3_env.endpoint_url)
    with pytest.raises(FetchError, match=f"object not found: s3://{s3_bucket}/nope/model.safetensors"):
        fetch(f"s3://{s3_bucket}/nope/model.safetensors", settings)
    with pytest.raises(FetchError, match="bucket 'no-such-bucket-x' does not exist"):
        fetch("s3://no-such-bucket-x/model.safetensors", settings)
    with pytest.raises(FetchError, match=f"no objects under s3://{s3_bucket}/empty/"):
        fetch(f"s3://{s3_bucket}/empty/", settings)


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_clear_error_without_secret(s3_server, s3_env, s3_bucket, tmp_path, monkeypatch, caplog,
                                                      variable):
    uri = put(s3_server, s3_bucket, "creds/x.bin", b"x" * 1000)
    wrong = "Wr0ng-Value-Do-Not-Leak"
    monkeypatch.setenv(variable, wrong)
    caplog.set_level(logging.DEBUG)  # botocore's own debug logging included
    with pytest.raises(FetchError) as info:
        fetch(uri, settings_for(tmp_path, s3_server.endpoint_url))
    message = str(info.value)
    assert uri in message and "credentials rejected" in message and variable in message
    assert wrong not in message
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the secret in use, right or wrong, is never shown
    assert secret not in message and secret not in caplog.text


def test_unreachable_store_fails_within_bounds(tmp_path, s3_env):
    from tests.fixtures.s3 import free_ports

    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(FetchError, match=f"cannot reach the S3 endpoint {endpoint}"):
        fetch("s3://bucket/x.bin", settings_for(tmp_path, endpoint, fetch_retries=1, fetch_timeout_s=2))
    assert time.monotonic() - t0 < 20


def test_presigned_https_url(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path):
    data = os.urandom(900_000)
    put(s3_server, s3_bucket, "signed/lora.safetensors", data)
    signer = s3_server.client(endpoint_url=s3_proxy.endpoint_url)

    def presign(key: str) -> str:
        return signer.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": key}, ExpiresIn=600)

    settings = settings_for(tmp_path, None)
    path = fetch(presign("signed/lora.safetensors"), settings)
    assert path.read_bytes() == data and path.name == "lora.safetensors"
    assert s3_proxy.count("GET") > 2  # a probe and parallel ranges
    s3_proxy.reset()
    time.sleep(1.1)  # a URL signed later differs only in its signature: same cache entry
    assert fetch(presign("signed/lora.safetensors"), settings) == path
    assert s3_proxy.requests == []
    missing = presign("signed/missing.safetensors")
    with pytest.raises(FetchError) as info:
        fetch(missing, settings)
    assert "object not found" in str(info.value) and "signed/missing.safetensors" in str(info.value)
    assert "Signature" not in str(info.value) and "AWSAccessKeyId" not in str(info.value)


def test_https_weights_direct_and_redirected_are_ranged_pinned_and_the_same(tmp_path):
    """An operator's http(s) URL is read in ranged parts, each sent with If-Match (the probe's ETag), whether it
    answers directly (read into one buffer) or through a redirect (requests follows it)."""
    from tests.fixtures.http_files import FileHandler, serving

    data = os.urandom(700_000)
    gets = []

    class Handler(FileHandler):
        def do_GET(self):
            gets.append((self.path, self.headers.get("Range"), self.headers.get("If-Match")))
            if self.path.startswith("/moved/"):
                self.send_response(302)
                self.send_header("Location", "/direct/w.safetensors?from=moved")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_file(data)

        def end_headers(self):
            self.send_header("ETag", '"v1"')
            super().end_headers()

    with serving(Handler) as server:
        for where in ("direct", "moved"):
            gets.clear()
            path = fetch(f"{server.url}/{where}/w.safetensors", settings_for(tmp_path / where, None))
            assert path.read_bytes() == data
            parts = [(rng, match) for target, rng, match in gets
                     if target.startswith("/direct/") and rng != "bytes=0-0"]
            assert len(parts) == 3 and all(rng and match == '"v1"' for rng, match in parts), gets


def test_https_weights_keep_the_credentials_requests_would_send(tmp_path, monkeypatch):
    """A URL with user:password, or a host in a .netrc file, is fetched with its Basic credentials (requests sends
    them; the buffered reads would not, so those fetches stay with requests)."""
    import base64

    from tests.fixtures.http_files import FileHandler, serving

    data = os.urandom(300_000)
    wanted = "Basic " + base64.b64encode(b"weights:s3cret").decode()

    class Handler(FileHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != wanted:
                self.send_body(401, b"who are you")
            else:
                self.send_file(data)

    with serving(Handler) as server:
        host = server.url.removeprefix("http://")
        path = fetch(f"http://weights:s3cret@{host}/in-url.bin", settings_for(tmp_path / "url", None))
        assert path.read_bytes() == data
        netrc = tmp_path / ".netrc"
        netrc.write_text("machine 127.0.0.1 login weights password s3cret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        assert fetch(f"{server.url}/netrc.bin", settings_for(tmp_path / "netrc", None)).read_bytes() == data


# ----------------------------------------------------------------------------------------------------------------
# Resume, locking, eviction, progress
# ----------------------------------------------------------------------------------------------------------------
def _sidecars(cache_dir: Path) -> list[Path]:
    return list(cache_dir.glob("v1/staging/*/partial/*.json"))


def test_interrupted_download_resumes_with_the_remainder_only(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path):
    data = os.urandom(2 * MiB)
    uri = put(s3_server, s3_bucket, "resume/model.safetensors", data)
    settings = settings_for(tmp_path, s3_proxy.endpoint_url, fetch_part_mb=0.125, fetch_concurrency=2,
                            fetch_retries=0)
    s3_proxy.fail_after(700_000)  # the connection drops mid-download
    with pytest.raises(FetchError, match="model.safetensors"):
        fetch(uri, settings, sha256=sha(data))
    (sidecar,) = _sidecars(settings.cache_dir)
    state = json.loads(sidecar.read_text())
    part = 128 * 1024
    present = len(state["done"]) * part
    assert 0 < present < len(data)
    s3_proxy.reset()
    path = fetch(uri, settings, sha256=sha(data))
    assert path.read_bytes() == data
    assert s3_proxy.bytes_sent("GET") == len(data) - present
    assert _sidecars(settings.cache_dir) == []


def test_interrupted_folder_fetch_keeps_finished_files(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path):
    blobs = {f"f{i}.bin": os.urandom(300_000) for i in range(3)}
    for name, data in blobs.items():
        put(s3_server, s3_bucket, f"folder/{name}", data)
    settings = settings_for(tmp_path, s3_proxy.endpoint_url, fetch_part_mb=0.125, fetch_concurrency=1,
                            fetch_retries=0)
    s3_proxy.fail_after(500_000)  # f0 complete, f1 cut inside its second part
    with pytest.raises(FetchError):
        fetch(f"s3://{s3_bucket}/folder/", settings)
    s3_proxy.reset()
    folder = fetch(f"s3://{s3_bucket}/folder/", settings)
    assert tree_bytes(folder) == blobs
    assert s3_proxy.bytes_sent("GET", listings=False) == 900_000 - 300_000 - 128 * 1024


def test_killed_process_download_resumes(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path):
    data = os.urandom(3 * MiB)
    uri = put(s3_server, s3_bucket, "killed/model.safetensors", data)
    settings = settings_for(tmp_path, s3_proxy.endpoint_url, fetch_part_mb=0.125, fetch_concurrency=2)
    env = {"SD_CACHE_DIR": str(settings.cache_dir), "SD_S3_ENDPOINT_URL": s3_proxy.endpoint_url,
           "SD_FETCH_PART_MB": "0.125", "SD_FETCH_CONCURRENCY": "2"}
    s3_proxy.rate_limit(1_000_000)  # ~3 s for the whole object
    proc = fetch_in_subprocess(uri, env, sha(data))
    try:
        deadline = time.monotonic() + 30
        done: list[int] = []
        while time.monotonic() < deadline and len(done) < 4:
            for sidecar in _sidecars(settings.cache_dir):
                done = json.loads(sidecar.read_text()).get("done", [])
            time.sleep(0.05)
        assert len(done) >= 4, "the subprocess never recorded progress"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert WeightsCache(settings.cache_dir).lookup(content_key(sha(data))) is None
    s3_proxy.reset()
    path = fetch(uri, settings, sha256=sha(data))
    assert path.read_bytes() == data
    assert s3_proxy.bytes_sent("GET") <= len(data) - len(done) * 128 * 1024


def test_two_processes_fetch_the_same_object_once(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path):
    data = os.urandom(4 * MiB)
    uri = put(s3_server, s3_bucket, "shared/model.safetensors", data)
    cache_dir = tmp_path / "shared-volume"
    env = {"SD_CACHE_DIR": str(cache_dir), "SD_S3_ENDPOINT_URL": s3_proxy.endpoint_url, "SD_FETCH_PART_MB": "0.5"}
    s3_proxy.rate_limit(2_000_000)  # ~2 s: the second process arrives while the first downloads
    procs = [fetch_in_subprocess(uri, env, sha(data)) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == data
    assert s3_proxy.bytes_sent("GET") == len(data)  # one download in all
    assert any("waiting for another process" in err for _, err in results)


def test_eviction_keeps_the_budget_in_lru_order(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path):
    blobs = {name: os.urandom(1_000_000) for name in "abc"}
    uris = {name: put(s3_server, s3_bucket, f"lru/{name}.bin", data) for name, data in blobs.items()}
    settings = settings_for(tmp_path, s3_proxy.endpoint_url, cache_max_gb=0.0025)  # room for two
    cache = WeightsCache.from_settings(settings)
    fetch(uris["a"], settings)
    time.sleep(0.02)
    fetch(uris["b"], settings)
    time.sleep(0.02)
    fetch(uris["a"], settings)  # a hit: a is now the most recently used
    time.sleep(0.02)
    fetch(uris["c"], settings)  # over budget: b, the least recently used, goes
    assert cache.usage() <= 2_500_000
    s3_proxy.reset()
    assert fetch(uris["a"], settings).read_bytes() == blobs["a"]
    assert fetch(uris["c"], settings).read_bytes() == blobs["c"]
    assert s3_proxy.requests == []
    assert fetch(uris["b"], settings).read_bytes() == blobs["b"]  # b was evicted: fetched again
    assert s3_proxy.bytes_sent("GET") == len(blobs["b"])
    assert cache.usage() <= 2_500_000


def test_progress_lines_while_fetching(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path, caplog):
    data = os.urandom(1_500_000)
    uri = put(s3_server, s3_bucket, "progress/model.safetensors", data)
    s3_proxy.rate_limit(2_000_000)
    caplog.set_level(logging.INFO, logger="sd_core.fetch")
    fetch(uri, settings_for(tmp_path, s3_proxy.endpoint_url, fetch_progress_s=0.2))
    lines = [r.getMessage() for r in caplog.records if r.name == "sd_core.fetch"]
    periodic = [line for line in lines if "ETA" in line]
    assert periodic, lines
    assert all(uri in line and "MB/s" in line and "MB / 1.5 MB" in line for line in periodic)
    assert any(line.startswith(f"fetched {uri}: 1.5 MB in") for line in lines)
