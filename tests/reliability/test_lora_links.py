"""Pasted LoRA links (Hugging Face, Civitai): the rewrite, the URL policy on the rewritten URL, full fetches from a
loopback hub and Civitai (HF_ENDPOINT / SD_CIVITAI_ENDPOINT), and the Civitai token that never leaks."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from sd_core.errors import InvalidRequest
from sd_core.lora_links import HubRepo, credential_headers, rewrite_lora_link
from sd_core.schema import GenerationRequest
from sd_core.settings import Settings
from sd_core.user_urls import check_user_url
from tests.fixtures.http_files import FileHandler, serving

HF = "https://huggingface.co"
CIVITAI = "https://civitai.com"
TOKEN = "civitai-secret-token-123"
PLAIN = Settings()

REWRITES = [
    ("https://huggingface.co/org/ink-lora", HubRepo("org/ink-lora")),
    ("https://huggingface.co/org/ink-lora/", HubRepo("org/ink-lora")),
    ("huggingface.co/org/ink-lora", HubRepo("org/ink-lora")),
    ("https://huggingface.co/org/ink-lora/tree/v2", HubRepo("org/ink-lora", "v2")),
    ("https://huggingface.co/org/ink-lora/tree/v2/", HubRepo("org/ink-lora", "v2")),
    ("hf://org/ink-lora", HubRepo("org/ink-lora")),
    ("huggingface.co/org/ink-lora/ink.safetensors", f"{HF}/org/ink-lora/resolve/main/ink.safetensors"),
    ("https://huggingface.co/org/ink-lora/sub/ink.safetensors", f"{HF}/org/ink-lora/resolve/main/sub/ink.safetensors"),
    ("https://huggingface.co/org/ink-lora/blob/main/ink.safetensors",
     f"{HF}/org/ink-lora/resolve/main/ink.safetensors"),
    ("https://huggingface.co/org/ink-lora/blob/a1b2c3/ink.safetensors",
     f"{HF}/org/ink-lora/resolve/a1b2c3/ink.safetensors"),
    ("https://huggingface.co/org/ink-lora/resolve/main/ink.safetensors?download=true",
     f"{HF}/org/ink-lora/resolve/main/ink.safetensors?download=true"),
    ("https://hf.co/org/ink-lora/resolve/main/ink.safetensors", f"{HF}/org/ink-lora/resolve/main/ink.safetensors"),
    ("hf://org/ink-lora@v2/ink.safetensors", f"{HF}/org/ink-lora/resolve/v2/ink.safetensors"),
    ("https://civitai.com/api/download/models/12345", f"{CIVITAI}/api/download/models/12345"),
    ("https://civitai.com/api/download/models/12345?type=Model&format=SafeTensor&token=abc",
     f"{CIVITAI}/api/download/models/12345?type=Model&format=SafeTensor&token=abc"),
    ("civitai.com/api/download/models/12345", f"{CIVITAI}/api/download/models/12345"),
    ("https://civitai.com/models/999/ink-style?modelVersionId=12345", f"{CIVITAI}/api/download/models/12345"),
    ("civitai.com/models/999?modelVersionId=12345", f"{CIVITAI}/api/download/models/12345"),
    # not pasted-page forms: unchanged
    ("tiny-style", "tiny-style"),
    ("s3://bucket/loras/ink.safetensors", "s3://bucket/loras/ink.safetensors"),
    ("https://example.com/ink.safetensors", "https://example.com/ink.safetensors"),
    ("https://huggingface.co/datasets/org/set/resolve/main/x.safetensors",
     "https://huggingface.co/datasets/org/set/resolve/main/x.safetensors"),
]


@pytest.mark.parametrize(("source", "expected"), REWRITES)
def test_pasted_forms_are_rewritten_to_download_urls(source, expected):
    assert rewrite_lora_link(source, PLAIN, field="loras") == expected


def test_endpoints_replace_the_public_hosts():
    mirror = Settings(hf_endpoint="https://hf-mirror.example/", civitai_endpoint="https://civitai-mirror.example")
    assert (rewrite_lora_link("huggingface.co/org/r/x.safetensors", mirror, field="loras")
            == "https://hf-mirror.example/org/r/resolve/main/x.safetensors")
    assert (rewrite_lora_link("civitai.com/models/1?modelVersionId=2", mirror, field="loras")
            == "https://civitai-mirror.example/api/download/models/2")


@pytest.mark.parametrize(("source", "words"), [
    ("https://civitai.com/models/999/ink-style", "not one of its versions"),
    ("https://civitai.com/user/someone", "not a Civitai LoRA link"),
    ("https://civitai.com/api/download/models/../../etc", "not a Civitai LoRA link"),
    ("https://huggingface.co/org", "expected huggingface.co/<org>/<repo>"),
    ("https://huggingface.co/org/repo/tree/main/sub", "names a folder"),
    ("https://huggingface.co/org/repo/blob/main/../../x.safetensors", "no file"),
    ("https://huggingface.co/org/re%2Fpo/x.safetensors", "not a Hugging Face repository"),
    ("hf://org", "expected hf://"),
])
def test_malformed_links_are_refused_naming_the_field(source, words):
    with pytest.raises(InvalidRequest) as info:
        rewrite_lora_link(source, PLAIN, field="loras")
    assert str(info.value).startswith("loras: ") and words in str(info.value), str(info.value)


def test_civitai_token_goes_to_the_civitai_endpoint_only():
    settings = Settings(civitai_token=TOKEN)
    civitai = check_user_url(f"{CIVITAI}/api/download/models/1", field="x", resolve=False)
    assert credential_headers(civitai, settings) == {"Authorization": f"Bearer {TOKEN}"}
    assert credential_headers(civitai, Settings()) == {}
    for other in ("https://cdn.example/file?sig=1", f"{CIVITAI}/api/download/models/1?token=own",
                  "https://civitai.com:8443/api/download/models/1", "http://civitai.com/api/download/models/1"):
        checked = check_user_url(other, field="x", resolve=False, settings=Settings(url_allowed_hosts=("civitai.com",)))
        assert credential_headers(checked, settings) == {}, other
    assert TOKEN not in repr(settings)


# --- a loopback hub and Civitai --------------------------------------------------------------------------------------
class _Handler(FileHandler):
    files: dict[str, bytes] = {}
    listings: dict[str, list] = {}
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):
        parts = urlsplit(self.path)
        self.seen.append((self.path, self.headers.get("Authorization")))
        if parts.path in self.listings:
            self.send_body(200, json.dumps(self.listings[parts.path]).encode())
        elif parts.path.startswith("/api/download/models/"):  # Civitai: a token is needed, then a CDN redirect
            if self.headers.get("Authorization") != f"Bearer {TOKEN}" and f"token={TOKEN}" not in parts.query:
                self.send_body(401, b"unauthorized")
                return
            self.send_response(307)
            port = self.server.server_address[1]  # the CDN is another host (localhost), as Civitai's is
            name = parts.path.rsplit("/", 1)[1]
            self.send_header("Location", f"http://localhost:{port}/cdn/{name}?X-Amz-Signature=a")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif "/resolve/" in parts.path and parts.path in self.files:  # the hub: resolve redirects to its CDN
            self.send_response(302)
            self.send_header("Location", "/cdn" + parts.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path.startswith("/cdn/"):
            name = parts.path.removeprefix("/cdn")
            body = self.files.get(name) or self.files.get("/civitai/" + name.lstrip("/"))
            if body is None:
                self.send_body(404, b"not found")
            else:
                self.send_file(body)
        else:
            self.send_body(404, b"not found")


@pytest.fixture(scope="module")
def hub(tiny_bucket):
    lora = (tiny_bucket / "loras" / "tiny-sd15-peft.safetensors").read_bytes()
    handler = type("Handler", (_Handler,), {"files": {}, "listings": {}, "seen": []})
    handler.files.update({"/org/ink/resolve/main/ink.safetensors": lora,
                          "/org/ink/resolve/main/pytorch_lora_weights.safetensors": lora,
                          "/civitai/12345": lora})
    handler.listings.update({
        "/api/models/org/ink/tree/main": [{"type": "file", "path": "README.md"},
                                          {"type": "file", "path": "ink.safetensors"},
                                          {"type": "directory", "path": "samples"}],
        "/api/models/org/many/tree/main": [{"type": "file", "path": "a.safetensors"},
                                           {"type": "file", "path": "b.safetensors"}],
        "/api/models/org/none/tree/main": [{"type": "file", "path": "model.ckpt"}],
    })
    with serving(handler) as server:
        server.seen = handler.seen
        yield server


@pytest.fixture
def linked_engine(engine_settings, hub, tmp_path):
    from sd_core.engine import Engine

    def make(**changes):
        settings = dataclasses.replace(engine_settings, hf_endpoint=hub.url, civitai_endpoint=hub.url,
                                       url_allowed_hosts=("127.0.0.1", "localhost"), cache_dir=tmp_path / "cache",
                                       **changes)
        return Engine(settings)

    return make


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"))


def generate(engine, source=None):
    loras = [{"source": source, "scale": 0.8}] if source else []
    return engine.generate(GenerationRequest(prompt="a red fox", seed=5, num_inference_steps=2, loras=loras))


def test_hugging_face_links_fetch_the_repos_lora(linked_engine, engine):
    local = pixels(generate(engine, "tiny-style"))
    assert not np.array_equal(local, pixels(generate(engine)))
    linked = linked_engine()
    for source in ("https://huggingface.co/org/ink", "huggingface.co/org/ink/ink.safetensors",
                   "https://huggingface.co/org/ink/blob/main/ink.safetensors", "hf://org/ink"):
        assert np.array_equal(pixels(generate(linked, source)), local), source
    # an A1111 prompt tag takes the same links (RunPod's A1111 payloads, Cog's prompt)
    tagged = linked.generate(GenerationRequest(prompt="a red fox <lora:huggingface.co/org/ink:0.8>", seed=5,
                                               num_inference_steps=2))
    assert np.array_equal(pixels(tagged), local)


@pytest.mark.parametrize(("repo", "words"), [
    ("many", "has 2 .safetensors files ('a.safetensors', 'b.safetensors'); give the link of one"),
    ("none", "no .safetensors file at its top level"),
    ("missing", "HTTP 404"),
])
def test_repository_without_exactly_one_lora_file_is_refused(linked_engine, repo, words):
    with pytest.raises(InvalidRequest) as info:
        generate(linked_engine(), f"https://huggingface.co/org/{repo}")
    assert str(info.value).startswith("loras: ") and words in str(info.value), str(info.value)


def test_civitai_link_with_the_settings_token_never_leaks_it(linked_engine, engine, hub, caplog):
    local = pixels(generate(engine, "tiny-style"))
    caplog.set_level(logging.INFO)  # the worker's level (sd_core.serving.setup_logging)
    with pytest.raises(InvalidRequest) as info:  # no token: the server's 401, without the URL's query
        generate(linked_engine(), "https://civitai.com/api/download/models/12345?token=wrong-user-token")
    assert "wrong-user-token" not in str(info.value) and "401" in str(info.value), str(info.value)
    del hub.seen[:]
    result = generate(linked_engine(civitai_token=TOKEN), "https://civitai.com/models/7/ink?modelVersionId=12345")
    assert np.array_equal(pixels(result), local)
    to_civitai = [auth for path, auth in hub.seen if path.startswith("/api/download/")]
    to_cdn = [auth for path, auth in hub.seen if path.startswith("/cdn/")]
    assert to_civitai and set(to_civitai) == {f"Bearer {TOKEN}"}
    assert to_cdn and set(to_cdn) == {None}  # the redirect target never gets the token
    assert TOKEN not in caplog.text and "wrong-user-token" not in caplog.text
    assert TOKEN not in result.parameters and TOKEN not in result.request.model_dump_json()


def test_a_file_fetched_with_a_token_is_cached_for_that_token_only(linked_engine, engine, hub):
    local = pixels(generate(engine, "tiny-style"))
    link = "https://civitai.com/api/download/models/12345"
    with_token = linked_engine()  # every engine of this test shares one cache folder (tmp_path / "cache")
    assert np.array_equal(pixels(generate(with_token, f"{link}?token={TOKEN}")), local)
    del hub.seen[:]
    assert np.array_equal(pixels(generate(with_token, f"{link}?token={TOKEN}")), local)
    assert hub.seen == []  # the same credential: served from the cache
    for other in (link, f"{link}?token=another-users-token"):  # none, or another: asked again, refused by Civitai
        with pytest.raises(InvalidRequest, match="401"):
            generate(with_token, other)
    worker_token = linked_engine(civitai_token=TOKEN)  # the worker's token: its own entry, fetched with the header
    assert np.array_equal(pixels(generate(worker_token, link)), local)
    assert [auth for path, auth in hub.seen if path.startswith("/api/download/")][-1] == f"Bearer {TOKEN}"
    with pytest.raises(InvalidRequest, match="401"):  # a worker without the token on the same cache volume
        generate(linked_engine(), link)


def test_a_link_whose_rewritten_url_points_at_a_blocked_host_is_refused(engine_settings, tmp_path, hub):
    from sd_core.engine import Engine

    def engine_with(**changes):
        return Engine(dataclasses.replace(engine_settings, cache_dir=tmp_path, **changes))

    cases = [
        ({"hf_endpoint": "https://169.254.169.254"}, "huggingface.co/org/ink/ink.safetensors", "metadata"),
        ({"hf_endpoint": "https://127.0.0.1"}, "https://huggingface.co/org/ink", "loopback"),
        ({"hf_endpoint": hub.url}, "https://huggingface.co/org/ink", "http:// is only accepted"),
        ({"civitai_endpoint": "https://10.1.2.3"}, "civitai.com/models/1?modelVersionId=2", "private"),
    ]
    for changes, source, words in cases:
        with pytest.raises(InvalidRequest) as info:
            generate(engine_with(**changes), source)
        assert str(info.value).startswith("loras: ") and words in str(info.value), (changes, str(info.value))
