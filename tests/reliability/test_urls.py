"""Hostile user URLs: the policy in sd_core/user_urls.py refuses private/metadata addresses, odd spellings, bad schemes,
unsafe redirects, oversize and slow bodies, and path traversal; through the engine (init images) and LoRA sources."""

from __future__ import annotations

import dataclasses
import gzip
import io
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest
from sd_core.settings import Settings
from sd_core.user_downloads import download_user_url
from sd_core.user_urls import check_lora_source, check_name, check_user_url, redact_url
from tests.fixtures.http_files import FileHandler, serving

STRICT = Settings()  # the defaults: nothing private allowed
LOCAL = Settings(url_allowed_hosts=("127.0.0.1",))


def png_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3)).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class _Handler(FileHandler):
    protocol_version = "HTTP/1.1"
    hits: dict[str, int]

    def do_GET(self):  # noqa: N802 - http.server's naming
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.hits[parts.path] = self.hits.get(parts.path, 0) + 1
        if parts.path == "/png":
            self.send_body(200, png_bytes())
        elif parts.path in self.files:
            self.send_file(self.files[parts.path])
        elif parts.path == "/redirect":
            self._redirect(query["to"])
        elif parts.path == "/loop":
            self._redirect("/loop")
        elif parts.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", query["n"])
            self.end_headers()
            remaining = int(query["n"])
            try:
                while remaining > 0:
                    self.wfile.write(b"\0" * min(remaining, 1 << 16))
                    remaining -= 1 << 16
            except OSError:
                pass
        elif parts.path == "/endless":  # no Content-Length: only counting can stop it
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(2048):  # 128 MB at most
                    self.wfile.write(b"\0" * (1 << 16))
            except OSError:
                pass
            self.close_connection = True
        elif parts.path == "/gzip":  # a gzip bomb, sent although we asked for identity
            body = gzip.compress(b"\0" * (50 << 20))
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif parts.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            self.send_body(404, b"not found")

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def web():
    """A local web server on 127.0.0.1 (reached through the SD_URL_ALLOWED_HOSTS allow-list), with hit counts."""
    handler = type("Handler", (_Handler,), {"hits": {}, "files": {}})
    with serving(handler) as server:
        server.hits = handler.hits
        server.files = handler.files
        yield server


REFUSED = [
    # (url, words the message must contain)
    ("https://169.254.169.254/latest/meta-data/iam/", "metadata"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://93.184.215.14/x.png", "SD_URL_ALLOWED_HOSTS"),
    ("https://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("https://[::ffff:169.254.169.254]/", "metadata"),
    ("https://[::ffff:a9fe:a9fe]/", "metadata"),
    ("https://[64:ff9b::a9fe:a9fe]/", "metadata"),  # NAT64
    ("https://[2002:a9fe:a9fe::1]/", "metadata"),  # 6to4
    ("https://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("https://127.0.0.1/x.png", "loopback"),
    ("https://10.0.0.5/x.png", "private"),
    ("https://172.16.3.4/x.png", "private"),
    ("https://192.168.1.1/x.png", "private"),
    ("https://100.64.0.1/x.png", "non-public"),
    ("https://169.254.10.10/x.png", "link-local"),
    ("https://0.0.0.0/x.png", "unspecified"),
    ("https://224.0.0.251/x.png", "multicast"),
    ("https://[::1]/x.png", "loopback"),
    ("https://[::]/x.png", "unspecified"),
    ("https://[::ffff:127.0.0.1]/x.png", "loopback"),
    ("https://[::ffff:10.0.0.1]/x.png", "private"),
    ("https://[fe80::1]/x.png", "link-local"),
    ("https://[fc00::1]/x.png", "private"),
    ("https://2130706433/x.png", "ambiguous numeric host"),  # decimal 127.0.0.1
    ("https://0177.0.0.1/x.png", "ambiguous numeric host"),  # octal
    ("https://0x7f.0.0.1/x.png", "ambiguous numeric host"),  # hex
    ("https://0x7f000001/x.png", "ambiguous numeric host"),
    ("https://127.1/x.png", "ambiguous numeric host"),  # short form
    ("https://017700000001/x.png", "ambiguous numeric host"),
    ("https://localhost/x.png", "loopback"),  # a DNS name that resolves to a private address
    ("https://LOCALHOST./x.png", "loopback"),
    ("file:///etc/passwd", "file://"),
    ("FILE:///etc/passwd", "file://"),
    ("/etc/passwd", "not a path"),
    ("../../etc/passwd", "not a path"),
    ("ftp://example.com/x.png", "scheme 'ftp'"),
    ("gopher://example.com/", "scheme 'gopher'"),
    ("http://example.com/x.png", "SD_URL_ALLOWED_HOSTS"),  # plain http needs an explicitly configured host
    ("https://user:secret@example.com/x.png", "credentials"),
    ("https://example.com\\@127.0.0.1/", "backslashes"),
    ("https://exa mple.com/", "whitespace"),
    ("https://example.com/x\r\nHost: 127.0.0.1", "control"),
    ("https:///x.png", "no host"),
    ("https://[::1/", "not a valid URL"),
]


@pytest.mark.parametrize(("url", "words"), REFUSED, ids=[u[:48] for u, _ in REFUSED])
def test_hostile_urls_are_refused_before_any_connection(url, words):
    # pytest-socket blocks every connection except to loopback: an attempt would raise SocketBlockedError instead.
    with pytest.raises(InvalidRequest) as info:
        download_user_url(url, field="image", max_bytes=1000, settings=STRICT)
    assert info.value.field == "image"
    assert words.lower() in str(info.value).lower(), str(info.value)
    assert "secret" not in str(info.value)


def test_metadata_is_refused_even_when_an_allow_list_entry_covers_it():
    settings = Settings(url_allowed_hosts=("169.254.169.254", "169.254.0.0/16", "fd00:ec2::/32"))
    for url in ("http://169.254.169.254/latest/", "https://[fd00:ec2::254]/", "http://metadata.google.internal/"):
        with pytest.raises(InvalidRequest, match="metadata"):
            check_user_url(url, field="image", settings=settings)
    assert check_user_url("http://169.254.10.10/x", field="image", settings=settings).addresses == ("169.254.10.10",)


def test_allow_list_names_hosts_and_networks():
    assert check_user_url("http://127.0.0.1:9/x", field="f", settings=LOCAL).addresses == ("127.0.0.1",)
    with pytest.raises(InvalidRequest, match="loopback"):  # the allow-list names 127.0.0.1, not the name localhost
        check_user_url("https://localhost:9/x", field="f", settings=LOCAL)
    networks = Settings(url_allowed_hosts=("10.0.0.0/8",))
    assert check_user_url("http://10.2.3.4/x", field="f", settings=networks).host == "10.2.3.4"
    with pytest.raises(InvalidRequest, match="private"):
        check_user_url("https://192.168.0.1/x", field="f", settings=networks)


def test_settings_read_the_url_policy_from_the_environment():
    settings = Settings.from_env({"SD_URL_ALLOWED_HOSTS": "127.0.0.1, models.internal",
                                  "SD_URL_MAX_BYTES": "1234", "SD_URL_TIMEOUT_S": "2.5"})
    assert settings.url_allowed_hosts == ("127.0.0.1", "models.internal")
    assert (settings.url_max_bytes, settings.url_timeout_s) == (1234, 2.5)


def test_allowed_local_download_works(web):
    data = download_user_url(f"{web.url}/png", field="image", max_bytes=10**6, settings=LOCAL)
    assert Image.open(io.BytesIO(data)).size == (64, 64)


def test_redirect_to_metadata_is_refused_before_connecting(web):
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="metadata") as info:
        download_user_url(f"{web.url}/redirect?to=http://169.254.169.254/latest/meta-data/", field="image",
                          max_bytes=10**6, settings=Settings(url_allowed_hosts=("127.0.0.1", "169.254.169.254")))
    assert time.monotonic() - started < 2  # no connect timeout was waited for: nothing was tried
    assert info.value.field == "image"


def test_redirect_to_a_private_name_is_refused_and_never_reached(web):
    hits = web.hits.get("/secret", 0)
    port = web.server_address[1]
    for target in (f"http://localhost:{port}/secret", f"https://localhost:{port}/secret",
                   f"http://[::ffff:127.0.0.1]:{port}/secret", f"http://2130706433:{port}/secret",
                   "file:///etc/passwd"):
        with pytest.raises(InvalidRequest):
            download_user_url(f"{web.url}/redirect?to={target}", field="image", max_bytes=10**6, settings=LOCAL)
    assert web.hits.get("/secret", 0) == hits, "a refused redirect target was contacted"


def test_redirects_are_followed_and_bounded(web):
    data = download_user_url(f"{web.url}/redirect?to=/png", field="image", max_bytes=10**6, settings=LOCAL)
    assert data.startswith(b"\x89PNG")
    with pytest.raises(InvalidRequest, match="more than 5 redirects"):
        download_user_url(f"{web.url}/loop", field="image", max_bytes=10**6, settings=LOCAL)


def test_declared_oversize_body_is_refused_without_reading_it(web):
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="larger than the limit of 1000000 bytes"):
        download_user_url(f"{web.url}/big?n={10**9}", field="image", max_bytes=10**6, settings=LOCAL)
    assert time.monotonic() - started < 2


def test_undeclared_oversize_body_is_cut_at_the_limit(web):
    with pytest.raises(InvalidRequest, match="larger than the limit of 1000000 bytes"):
        download_user_url(f"{web.url}/endless", field="image", max_bytes=10**6, settings=LOCAL)
    capped = dataclasses.replace(LOCAL, url_max_bytes=5000)  # SD_URL_MAX_BYTES caps every caller
    with pytest.raises(InvalidRequest, match="limit of 5000 bytes"):
        download_user_url(f"{web.url}/big?n=6000", field="image", max_bytes=10**6, settings=capped)
    assert len(download_user_url(f"{web.url}/big?n=5000", field="image", max_bytes=10**6, settings=capped)) == 5000


def test_compressed_bodies_are_never_inflated(web):
    data = download_user_url(f"{web.url}/gzip", field="image", max_bytes=10**6, settings=LOCAL)
    assert len(data) < 1_000_000  # the raw gzip bytes, not 50 MB of zeros


def test_slow_body_hits_the_time_limit(web):
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="longer than 0.5 s"):
        download_user_url(f"{web.url}/slow", field="image", max_bytes=10**6,
                          settings=dataclasses.replace(LOCAL, url_timeout_s=0.5))
    assert time.monotonic() - started < 3


def test_http_errors_and_refused_connections_are_clear(web):
    with pytest.raises(InvalidRequest, match="HTTP 404"):
        download_user_url(f"{web.url}/nothing", field="image", max_bytes=10**6, settings=LOCAL)
    with pytest.raises(InvalidRequest, match="failed"):
        download_user_url("http://127.0.0.1:9/x.png", field="image", max_bytes=10**6, settings=LOCAL)


def test_messages_never_quote_query_strings_or_credentials():
    assert redact_url("https://host/x.safetensors?X-Amz-Signature=abc&token=zzz") == "https://host/x.safetensors?…"
    with pytest.raises(InvalidRequest) as info:
        check_user_url("https://10.0.0.1/x?token=topsecret", field="loras", settings=STRICT)
    assert "topsecret" not in str(info.value)


TRAVERSAL = ["../x", "a/../../b", "/etc/passwd", "a\\b", "..\\..\\windows", "C:/x", "./x", "a//b", "x\x00y", ""]


@pytest.mark.parametrize("name", TRAVERSAL, ids=repr)
def test_path_traversal_in_names_is_refused(name):
    with pytest.raises(InvalidRequest) as info:
        check_name(name, field="loras")
    assert info.value.field == "loras"


@pytest.mark.parametrize("source", [
    "file:///etc/passwd", "/etc/passwd", "~/.aws/credentials", "../secrets.safetensors", "s3://bucket/../other/x",
    "s3://bucket/a/%2e%2e/b", "https://169.254.169.254/lora.safetensors", "http://example.com/lora.safetensors",
    "s3://Bad_Bucket!/x",
])
def test_lora_sources_follow_the_policy(source):
    with pytest.raises(InvalidRequest) as info:
        check_lora_source(source, field="loras", settings=STRICT)
    assert str(info.value).startswith("loras:")


def test_good_lora_sources_pass():
    assert check_lora_source("my-lora_v2.1", field="loras") == "my-lora_v2.1"
    allowed = Settings(user_s3_buckets=("weights",))
    assert check_lora_source("s3://weights/loras/a.safetensors", field="loras", settings=allowed).scheme == "s3"


# --- s3:// user URLs: the worker's own credentials read them, so only allow-listed buckets / prefixes -----------------
@pytest.mark.parametrize("settings,url,ok", [
    (Settings(), "s3://weights/loras/a.safetensors", False),  # no s3:// weights, no allow-list: none
    (Settings(weights_uri="s3://weights/sd"), "s3://weights/loras/a.safetensors", True),  # the weights bucket
    (Settings(weights_uri="s3://weights/sd"), "s3://private/a.safetensors", False),
    (Settings(weights_uri="s3://weights/sd", user_s3_buckets=("none",)), "s3://weights/a.safetensors", False),
    (Settings(user_s3_buckets=("a", "weights/loras/")), "s3://weights/loras/x/a.safetensors", True),
    (Settings(user_s3_buckets=("weights/loras",)), "s3://weights/loras/a.safetensors", True),
    (Settings(user_s3_buckets=("weights/loras/",)), "s3://weights/loras-private/a.safetensors", False),
    (Settings(user_s3_buckets=("weights/loras/",)), "s3://weights/models/a.safetensors", False),
    (Settings(user_s3_buckets=("weights/loras/",)), "s3://weights/x%2Floras/a.safetensors", False),
    (Settings(user_s3_buckets=("weights/loras/",)), "s3://weights/%6Coras/a.safetensors", False),
    (Settings(user_s3_buckets=("weights",)), "s3://Weights/a.safetensors", False),  # S3 would read another bucket
    (Settings(user_s3_buckets=("weights",)), "s3://weights2/a.safetensors", False),
    (Settings.from_env({"SD_USER_S3_BUCKETS": "x, weights/loras/"}), "s3://weights/loras/a.safetensors", True),
])
def test_s3_user_urls_need_an_allow_listed_bucket(settings, url, ok):
    if ok:
        assert check_lora_source(url, field="loras", settings=settings).scheme == "s3"
        return
    with pytest.raises(InvalidRequest) as info:
        check_lora_source(url + "?token=hush", field="loras", settings=settings)
    message = str(info.value)
    assert message.startswith("loras: ") and "SD_USER_S3_BUCKETS" in message and "hush" not in message, message


# --- through the engine: init images are user URLs too --------------------------------------------------------------
def test_engine_refuses_hostile_image_urls(make_engine):
    engine = make_engine()
    for url, words in [("file:///etc/passwd", "file://"), ("https://169.254.169.254/latest/x.png", "metadata"),
                       ("https://localhost/x.png", "loopback"), ("s3://bucket/x.png", "scheme 's3'")]:
        with pytest.raises(InvalidRequest) as info:
            engine.generate(GenerationRequest(prompt="x", image=url, seed=1))
        assert str(info.value).startswith("image:") and words in str(info.value), str(info.value)


def test_engine_fetches_allowed_image_url_and_refuses_it_by_default(make_engine, web):
    url = f"{web.url}/png"
    with pytest.raises(InvalidRequest, match="image: http:// is only accepted for hosts in SD_URL_ALLOWED_HOSTS"):
        make_engine().generate(GenerationRequest(prompt="x", image=url, seed=1, num_inference_steps=2))
    result = make_engine(url_allowed_hosts=("127.0.0.1",)).generate(
        GenerationRequest(prompt="x", image=url, seed=1, num_inference_steps=2))
    assert result.images[0].width == 64


# --- through the engine: LoRA URLs go through the same policy, also inside the storage layer's downloads ----------
@pytest.fixture(scope="module")
def lora_web(web, tiny_bucket):
    web.files["/loras/style.safetensors"] = (tiny_bucket / "loras" / "tiny-sd15-peft.safetensors").read_bytes()
    return web


def test_lora_url_from_an_allowed_host_is_fetched_and_applied(make_engine, lora_web, tmp_path):
    engine = make_engine(url_allowed_hosts=("127.0.0.1",), cache_dir=tmp_path)
    request = dict(prompt="a red fox", seed=3, num_inference_steps=2)
    url = f"{lora_web.url}/loras/style.safetensors"
    by_url = engine.generate(GenerationRequest(**request, loras=[{"source": url}]))
    by_name = engine.generate(GenerationRequest(**request, loras=[{"source": "tiny-style"}]))
    plain = engine.generate(GenerationRequest(**request))
    as_array = [np.asarray(Image.open(io.BytesIO(r.images[0].data))) for r in (by_url, by_name, plain)]
    assert np.array_equal(as_array[0], as_array[1])  # the same file, the same image
    assert not np.array_equal(as_array[0], as_array[2])  # and the LoRA did change it


def test_lora_urls_are_refused_by_default_and_redirects_rechecked(make_engine, lora_web, tmp_path):
    url = f"{lora_web.url}/loras/style.safetensors"
    with pytest.raises(InvalidRequest, match="^loras: http:// is only accepted for hosts in SD_URL_ALLOWED_HOSTS"):
        make_engine(cache_dir=tmp_path).generate(GenerationRequest(prompt="x", loras=[{"source": url}]))
    engine = make_engine(url_allowed_hosts=("127.0.0.1",), cache_dir=tmp_path)
    hits = lora_web.hits.get("/secret", 0)
    port = lora_web.server_address[1]
    for target, words in [("http://169.254.169.254/latest/meta-data/x.safetensors", "metadata"),
                          (f"https://localhost:{port}/secret", "loopback")]:
        with pytest.raises(InvalidRequest) as info:
            engine.generate(GenerationRequest(prompt="x", loras=[{"source": f"{lora_web.url}/redirect?to={target}"}]))
        assert str(info.value).startswith("loras:") and words in str(info.value), str(info.value)
    assert lora_web.hits.get("/secret", 0) == hits
    small = make_engine(url_allowed_hosts=("127.0.0.1",), cache_dir=tmp_path / "small", url_max_bytes=1000)
    with pytest.raises(InvalidRequest, match="^loras: .*larger than the limit of 1000 bytes"):
        small.generate(GenerationRequest(prompt="x", loras=[{"source": url}]))
    assert not list((tmp_path / "small").rglob("*.safetensors")), "an oversize download was kept"
