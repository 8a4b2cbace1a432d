"""Storage faults: devtools.fault_proxy in front of the local S3 server (SeaweedFS) breaks responses (500/503, dropped
and reset connections, stalls, truncated and bit-flipped bodies). The fetch layer retries, resumes and verifies:
corrupted bytes are never loaded nor left in the cache under a final name, and a store that stays down makes the
cold start fail fast with a clear message (engine; Cog: SETUP_FAILED; RunPod: every job gets the reason)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from devtools.fault_proxy import FaultProxy
from sd_core import storage
from sd_core.errors import ChecksumMismatch, FetchError
from sd_core.schema import GenerationRequest
from sd_core.settings import REPO_ROOT, Settings
from sd_core.storage.cache import WeightsCache

OBJECT_GETS = r"^/[^/?]+/[^?]+"  # GET /bucket/key (not the bucket listing)
LISTINGS = r"list-type="


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"))


# --- the proxy itself ---------------------------------------------------------------------------------------------
class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = bytes(range(256)) * 4096  # 1 MiB

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture(scope="module")
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", "/object")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_fault_proxy_injects_each_fault_and_counts_it(fault_proxy, upstream):
    proxy = fault_proxy(upstream, stall_s=3, schedule=["error500", "error503", "drop", "reset", "truncate", "flip",
                                                       "stall", "ok"])
    body = _Upstream.body
    assert _get(proxy.url)[0] == 500
    assert _get(proxy.url)[0] == 503
    with pytest.raises(http.client.RemoteDisconnected):
        _get(proxy.url)
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        _get(proxy.url)
    with pytest.raises(http.client.IncompleteRead):
        _get(proxy.url)
    status, flipped = _get(proxy.url)
    assert status == 200 and len(flipped) == len(body) and flipped != body
    assert sum(a != b for a, b in zip(flipped, body, strict=True)) == 1
    with pytest.raises(TimeoutError):
        _get(proxy.url, timeout=0.5)
    assert _get(proxy.url) == (200, body)
    assert proxy.counters["injected"] == 7 and proxy.counters["requests"] == 8
    assert all(proxy.counters[f] == 1 for f in ("error500", "error503", "drop", "reset", "truncate", "flip", "stall"))
    proxy.configure(down=True)
    assert _get(proxy.url)[0] == 503
    proxy.configure(down=False, probability=1.0, faults=("error503",), seed=1)
    assert _get(proxy.url)[0] == 503


def test_fault_proxy_refuses_non_loopback_upstreams():
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://example.com:80")


# --- the tiny models in S3, with manifests pinned by scripts/ops/upload_weights.py -----------------------------------
def _load_uploader():
    from scripts.ops import upload_weights

    return upload_weights


@pytest.fixture(scope="module")
def pinned(s3_server, tiny_bucket, tmp_path_factory):
    """tiny-sd15 (diffusers folder), tiny-sd15-single (file + config) and its LoRA uploaded with upload_weights.py,
    which writes the sha256 pins into the manifests (starting from the repo's manifests, whose defaults it keeps)."""
    bucket = s3_server.make_bucket("faults")
    models = tmp_path_factory.mktemp("pinned-models")
    for name in ("tiny-sd15", "tiny-sd15-single"):
        data = yaml.safe_load((REPO_ROOT / "models" / f"{name}.yaml").read_text())
        data.pop("loras", None)
        (models / f"{name}.yaml").write_text(yaml.safe_dump(data))
    base = f"s3://{bucket}"
    common = ["--relative-to", base, "--models-dir", str(models)]
    uploader = _load_uploader()
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env.items():
            env.setenv(key, value)
        sd15 = tiny_bucket / "tiny-sd15"
        assert uploader.main(["model", str(sd15 / "diffusers"), f"{base}/tiny-sd15/diffusers/", "--name", "tiny-sd15",
                              "--architecture", "sd15", *common]) == 0
        assert uploader.main(["model", str(sd15 / "tiny-sd15.safetensors"), f"{base}/tiny-sd15/", "--name",
                              "tiny-sd15-single", "--architecture", "sd15", "--config", str(sd15 / "config"),
                              *common]) == 0
        assert uploader.main(["lora", str(tiny_bucket / "loras" / "tiny-sd15-peft.safetensors"), f"{base}/loras/",
                              "--model", "tiny-sd15", "--lora-name", "tiny-style", *common]) == 0
    return {"bucket": bucket, "models": models, "base": base}


def test_upload_weights_pins_every_file_by_sha256(pinned, tiny_bucket):
    folder = yaml.safe_load((pinned["models"] / "tiny-sd15.yaml").read_text())
    single = yaml.safe_load((pinned["models"] / "tiny-sd15-single.yaml").read_text())
    diffusers = tiny_bucket / "tiny-sd15" / "diffusers"
    expected = {p.relative_to(diffusers).as_posix(): sha256_of(p) for p in diffusers.rglob("*") if p.is_file()}
    assert folder["files"] == expected and folder["defaults"]["width"] == 64
    assert single["sha256"] == sha256_of(tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors")
    config = tiny_bucket / "tiny-sd15" / "config"
    assert single["config_files"] == {p.relative_to(config).as_posix(): sha256_of(p)
                                      for p in config.rglob("*") if p.is_file()}
    assert folder["loras"][0]["sha256"] == sha256_of(tiny_bucket / "loras" / "tiny-sd15-peft.safetensors")


def faulty_settings(pinned, proxy, cache_dir: Path, **changes) -> Settings:
    """A worker that reads its weights through the proxy: small parts (several ranged GETs per file), short timeouts."""
    return dataclasses.replace(Settings(
        models_dir=pinned["models"], weights_uri=pinned["base"], s3_endpoint_url=proxy.url, cache_dir=cache_dir,
        device="cpu", dtype="float32", default_model="tiny-sd15", fetch_part_mb=2.0, fetch_concurrency=2,
        fetch_retries=4, fetch_timeout_s=1.0, max_batch_images=1,
    ), **changes)


def assert_cache_clean(cache_dir: Path, tiny_bucket: Path) -> None:
    """Every file the cache holds under a final name is byte-identical to the original."""
    originals = {sha256_of(p) for p in tiny_bucket.rglob("*") if p.is_file()}
    for entry in WeightsCache(cache_dir).entries():
        root = entry.local_path if entry.local_path.is_dir() else entry.local_path.parent
        for path in (p for p in root.rglob("*") if p.is_file()):
            assert sha256_of(path) in originals, f"corrupted bytes cached under a final name: {path}"


ALL_FAULTS = ["error500", "error503", "drop", "reset", "truncate", "flip", "stall"]


def test_every_fault_kind_is_survived_by_a_pinned_fetch(pinned, s3_env, s3_fault_proxy, tiny_bucket, tmp_path,
                                                         reliability_tally):
    proxy = s3_fault_proxy.configure(schedule=ALL_FAULTS, path_pattern=OBJECT_GETS)
    proxy.stall_s = 3
    settings = faulty_settings(pinned, proxy, tmp_path)
    single = yaml.safe_load((pinned["models"] / "tiny-sd15-single.yaml").read_text())
    path = storage.fetch(f"{pinned['base']}/{single['uri']}", settings, sha256=single["sha256"])
    assert sha256_of(path) == single["sha256"]
    assert proxy.injected == len(ALL_FAULTS)
    # Resume, not restart: a part that broke is asked for again by its own range.
    broken = [(rng, fault) for _, _, rng, fault in proxy.log if fault in ("reset", "truncate", "stall")]
    retried = [rng for _, _, rng, fault in proxy.log if fault == "ok"]
    assert all(rng in retried and rng != "bytes=0-" for rng, _ in broken)
    assert_cache_clean(tmp_path, tiny_bucket)
    reliability_tally["storage faults injected"] += proxy.injected
    reliability_tally["storage faults survived"] += proxy.injected


def test_every_fault_kind_is_survived_by_a_presigned_url_fetch(pinned, s3_server, s3_fault_proxy, tiny_bucket,
                                                               tmp_path, reliability_tally):
    """The same faults on a presigned URL (the http(s) source, whose bytes are read into one reused buffer)."""
    proxy = s3_fault_proxy.configure(schedule=ALL_FAULTS, path_pattern=OBJECT_GETS)
    proxy.stall_s = 3
    single = yaml.safe_load((pinned["models"] / "tiny-sd15-single.yaml").read_text())
    key = f"{pinned['base']}/{single['uri']}".removeprefix(f"s3://{pinned['bucket']}/")
    url = s3_server.client(endpoint_url=proxy.url).generate_presigned_url(
        "get_object", Params={"Bucket": pinned["bucket"], "Key": key}, ExpiresIn=600)
    path = storage.fetch(url, faulty_settings(pinned, proxy, tmp_path), sha256=single["sha256"])
    assert sha256_of(path) == single["sha256"]
    assert proxy.injected == len(ALL_FAULTS)
    broken = [rng for _, _, rng, fault in proxy.log if fault in ("reset", "truncate", "stall") and rng != "bytes=0-0"]
    retried = [rng for _, _, rng, fault in proxy.log if fault == "ok"]
    assert broken and all(rng in retried for rng in broken)  # each broken part asked for again by its own range
    assert_cache_clean(tmp_path, tiny_bucket)
    reliability_tally["storage faults injected"] += proxy.injected
    reliability_tally["storage faults survived"] += proxy.injected


def test_listing_faults_are_survived(pinned, s3_env, s3_fault_proxy, tiny_bucket, tmp_path, reliability_tally):
    proxy = s3_fault_proxy.configure(schedule=["error503", "reset", "truncate", "error500"], path_pattern=LISTINGS)
    manifest = yaml.safe_load((pinned["models"] / "tiny-sd15.yaml").read_text())
    path = storage.fetch(f"{pinned['base']}/{manifest['uri']}", faulty_settings(pinned, proxy, tmp_path),
                         files=manifest["files"])
    assert {p.relative_to(path).as_posix(): sha256_of(p) for p in path.rglob("*") if p.is_file()} == manifest["files"]
    assert proxy.injected == 4
    reliability_tally["storage faults injected"] += proxy.injected
    reliability_tally["storage faults survived"] += proxy.injected


def test_bytes_corrupted_on_every_attempt_are_refused_and_never_cached(pinned, s3_env, s3_fault_proxy, tmp_path,
                                                                      tiny_bucket, reliability_tally):
    proxy = s3_fault_proxy.configure(probability=1.0, faults=("flip",), path_pattern=OBJECT_GETS)
    single = yaml.safe_load((pinned["models"] / "tiny-sd15-single.yaml").read_text())
    uri = f"{pinned['base']}/{single['uri']}"
    with pytest.raises(ChecksumMismatch) as info:
        storage.fetch(uri, faulty_settings(pinned, proxy, tmp_path), sha256=single["sha256"])
    assert str(info.value).startswith("sha256: sha256 mismatch for " + uri)
    assert WeightsCache(tmp_path).lookup(single["sha256"]) is None
    assert WeightsCache(tmp_path).entries() == []
    leftovers = [p for p in tmp_path.rglob("*.safetensors")]
    assert leftovers == [], f"corrupted bytes left under a final name: {leftovers}"
    reliability_tally["storage faults injected"] += proxy.injected
    reliability_tally["storage faults refused cleanly (never loaded)"] += proxy.injected


def test_engine_cold_start_under_random_faults_loads_exactly_the_right_weights(
    pinned, s3_env, s3_fault_proxy, tiny_bucket, tmp_path, make_engine, reliability_tally,
):
    from sd_core.engine import Engine

    proxy = s3_fault_proxy.configure(probability=0.35, faults=tuple(f for f in ALL_FAULTS if f != "stall"), seed=1,
                                     path_pattern=None)
    settings = faulty_settings(pinned, proxy, tmp_path, preload_models=("tiny-sd15", "tiny-sd15-single"))
    engine = Engine(settings)
    engine.preload()
    request = GenerationRequest(prompt="a red fox in the snow", seed=21, num_inference_steps=2)
    reference = make_engine(max_batch_images=1).generate(request)  # the same weights, read from local disk
    assert np.array_equal(pixels(engine.generate(request)), pixels(reference))
    styled = GenerationRequest(prompt="a red fox in the snow", seed=21, num_inference_steps=2,
                               loras=[{"source": "tiny-style"}])
    assert np.array_equal(pixels(engine.generate(styled)), pixels(make_engine(max_batch_images=1).generate(styled)))
    assert proxy.injected >= 5, dict(proxy.counters)
    assert_cache_clean(tmp_path, tiny_bucket)
    reliability_tally["storage faults injected"] += proxy.injected
    reliability_tally["storage faults survived"] += proxy.injected


@pytest.mark.parametrize("how", ["503", "refused"])
def test_store_that_stays_down_fails_the_cold_start_fast_and_clearly(pinned, s3_env, s3_fault_proxy, tmp_path, how,
                                                                    reliability_tally):
    from sd_core.engine import Engine

    proxy = s3_fault_proxy
    settings = faulty_settings(pinned, proxy, tmp_path, fetch_retries=2)
    if how == "503":
        proxy.configure(down=True)
    else:
        proxy.stop()  # nothing listens there any more
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        Engine(settings).preload()
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert f"{pinned['base']}/tiny-sd15/diffusers/" in message, message
    assert ("503" in message) if how == "503" else ("cannot reach the S3 endpoint" in message), message
    assert elapsed < 30, f"cold start took {elapsed:.1f}s to give up"
    reliability_tally["store-down cold starts failed cleanly"] += 1


def test_cog_setup_fails_with_the_reason_when_the_store_is_down(pinned, s3_server, s3_fault_proxy, cog_server_factory,
                                                                tmp_path):
    s3_fault_proxy.configure(down=True)
    server = cog_server_factory({
        **s3_server.env, "SD_MODELS_DIR": str(pinned["models"]), "SD_WEIGHTS_URI": pinned["base"],
        "SD_S3_ENDPOINT_URL": s3_fault_proxy.url, "SD_CACHE_DIR": str(tmp_path), "SD_FETCH_RETRIES": "1",
    })
    body, _ = server.wait_for_status("SETUP_FAILED", "READY", timeout=120)
    assert body["status"] == "SETUP_FAILED", body
    logs = body["setup"]["logs"]
    assert f"{pinned['base']}/tiny-sd15/diffusers/" in logs and "503" in logs, logs[-2000:]
    assert "Traceback" not in logs
    assert s3_server.secret_key not in server.log_text() + logs


def test_runpod_worker_reports_the_store_outage_on_every_job(pinned, s3_server, s3_fault_proxy, runpod_server_factory,
                                                             tmp_path):
    s3_fault_proxy.configure(down=True)
    server = runpod_server_factory({
        **s3_server.env, "SD_MODELS_DIR": str(pinned["models"]), "SD_WEIGHTS_URI": pinned["base"],
        "SD_S3_ENDPOINT_URL": s3_fault_proxy.url, "SD_CACHE_DIR": str(tmp_path), "SD_FETCH_RETRIES": "1",
        "OMP_NUM_THREADS": "1",
    }, ready_timeout=120)
    job = server.runsync({"prompt": "a fox", "num_inference_steps": 2})
    assert job["status"] == "FAILED", job
    assert job["error"].startswith("worker failed to start:"), job["error"]
    assert f"{pinned['base']}/tiny-sd15/diffusers/" in job["error"] and "503" in job["error"], job["error"]
    assert s3_server.secret_key not in server.log_text() + json.dumps(job)


# --- a full cache disk ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB filesystem (tmpfs) for the cache: writing past it fails with ENOSPC. Needs root (mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def assert_disk_full_handled(error: FetchError, uri: str, disk: Path) -> None:
    """The error names the object (redacted), never a local path; nothing of the download is left on the disk."""
    message = str(error)
    assert message.startswith("SD_CACHE_DIR: not enough disk space in the weights cache for "), message
    assert uri.split("?")[0] in message, message
    assert str(disk) not in message and "/v1/" not in message and "staging/" not in message, message
    assert "signed-secret" not in message, message
    leftovers = [p for p in disk.rglob("*") if p.is_file() and "locks" not in p.relative_to(disk).parts]
    assert leftovers == [], f"a disk-full download left files behind: {leftovers}"


def test_disk_full_while_preallocating_deletes_the_partial_and_names_the_object(s3_server, s3_env, small_disk):
    bucket = s3_server.make_bucket("full")
    data = bytes(range(256)) * 8192  # 2 MiB: more than the disk holds
    s3_server.client().put_object(Bucket=bucket, Key="big/model.safetensors", Body=data)
    uri = f"s3://{bucket}/big/model.safetensors"
    settings = Settings(cache_dir=small_disk, s3_endpoint_url=s3_server.endpoint_url, fetch_part_mb=0.25,
                        fetch_retries=0, fetch_timeout_s=10.0)
    with pytest.raises(FetchError) as info:
        storage.fetch(uri, settings, sha256=hashlib.sha256(data).hexdigest())
    assert_disk_full_handled(info.value, uri, small_disk)


def test_disk_full_while_streaming_deletes_the_partial_and_names_the_object(upstream, small_disk):
    uri = f"{upstream}/weights/model.bin?X-Amz-Signature=signed-secret"  # no Range support: one streaming GET, 1 MiB
    with pytest.raises(FetchError) as info:
        storage.fetch(uri, Settings(cache_dir=small_disk, fetch_retries=0, fetch_timeout_s=10.0))
    assert_disk_full_handled(info.value, uri, small_disk)


@pytest.mark.parametrize("on_limit", ["error", "killed"])
def test_file_size_limit_mid_download(upstream, tmp_path, on_limit):
    """RLIMIT_FSIZE (a real EFBIG from the kernel). Python ignores SIGXFSZ, so the write fails and the fetch cleans up
    at once; with SIGXFSZ at its default the kernel kills the process mid-write instead: its partial file has no parts
    record (it cannot be resumed) and is deleted when the next process opens the cache."""
    import resource
    import signal
    import sys

    cache_dir = tmp_path / "cache"
    uri = f"{upstream}/weights/model.bin?X-Amz-Signature=signed-secret"
    code = ("import signal\nfrom sd_core.settings import Settings\nfrom sd_core.storage import fetch\n"
            + ("signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n" if on_limit == "killed" else "")
            + f"fetch({uri!r}, Settings(cache_dir={str(cache_dir)!r}, fetch_retries=0))\n")

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size)
    if on_limit == "error":
        assert proc.returncode == 1, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("sd_core.errors.FetchError: SD_CACHE_DIR: not enough disk space"), last
        assert uri.split("?")[0] in last and str(cache_dir) not in last and "signed-secret" not in last, last
        assert [p for p in cache_dir.glob("v1/staging/**/*") if p.is_file()] == []
        return
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-2000:]
    (partial,) = [p for p in cache_dir.glob("v1/staging/*/partial/*")]
    WeightsCache.from_settings(Settings(cache_dir=cache_dir))
    assert not partial.exists() and list(cache_dir.glob("v1/staging/*")) == []
