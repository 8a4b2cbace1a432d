"""Cog's image/mask inputs go through sd_core's URL policy: Cog itself never fetches a user URL or reads a local path.

Cog's own input handling (cog 0.23.1) through `cog._inspector.check_input`, then the real Cog server (coglet): hostile
URLs and paths fail the prediction naming the field, a loopback listener sees no connection, and no query string or
credential shows up in the response or the server's log. One server, SD_URL_ALLOWED_HOSTS=localhost: the same
listener spelled `localhost` is an allowed host (the fetch works, so URLs are fetched by sd_core, not refused
wholesale), spelled any other way it is a private address and refused.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures.cog_server import start_cog_server

REPO = Path(__file__).resolve().parents[2]
FAST = {"prompt": "a lighthouse", "num_inference_steps": 2}
SECRET = "SECRETSIG123"


def png(size=(64, 64), color=(20, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class CountingServer(ThreadingHTTPServer):
    """HTTP on 127.0.0.1 serving a PNG at any path; counts every accepted connection (before any byte is read)."""

    daemon_threads = True

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                body = png((72, 64))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.connections = 0
        self.port = self.server_address[1]

    def get_request(self):
        request = super().get_request()
        self.connections += 1
        return request


@pytest.fixture(scope="module")
def listener():
    server = CountingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def cog_server(tiny_bucket, tmp_path_factory):
    env = {
        "SD_MODELS_DIR": str(REPO / "models"), "SD_WEIGHTS_URI": str(tiny_bucket),
        "SD_CACHE_DIR": str(tmp_path_factory.mktemp("cog-inputs-cache")), "SD_URL_ALLOWED_HOSTS": "localhost",
        "COG_MAX_CONCURRENCY": "2",  # with one slot, coglet can answer 409 to a prediction sent right after another
    }
    with start_cog_server(env, log_dir=tmp_path_factory.mktemp("cog-inputs-server")) as server:
        body, _ = server.wait_for_status("READY", "SETUP_FAILED", timeout=240)
        assert body["status"] == "READY", body
        yield server


# --- Cog's own input handling (no server) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner_inputs():
    """The input fields Cog builds from predict.py's Runner.run (importing predict.py installs the hook)."""
    from cog import _inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _inspector.create_predictor("predict", "Runner").inputs


@pytest.mark.parametrize("value", ["https://example.com/a.png?X-Amz-Signature=x", "http://127.0.0.1:9/x.png",
                                   "data:image/png;base64,iVBORw0KGgo=", "HTTPS://EXAMPLE.COM/a.png"])
def test_cog_hands_urls_and_data_uris_to_run_as_text_not_as_downloads(runner_inputs, value):
    import cog.types
    from cog import _inspector

    from cog_inputs import UserFileText

    for field in ("image", "mask"):
        normalized = _inspector.check_input(runner_inputs, {**FAST, field: value})[field]
        assert isinstance(normalized, UserFileText) and normalized == value
        assert not isinstance(normalized, cog.types.URLPath | Path)  # coglet downloads every URLPath before run()


@pytest.mark.parametrize("value", ["/etc/hostname", "etc/hostname", "file:///etc/hostname", "ftp://example.com/x.png",
                                   "~/.ssh/id_rsa"])
def test_cog_refuses_local_paths_and_other_schemes_naming_the_field(runner_inputs, value):
    from cog import _inspector

    for field in ("image", "mask"):
        with pytest.raises(ValueError, match=f"^{field}: expected an image file") as caught:
            _inspector.check_input(runner_inputs, {**FAST, field: value})
        assert value not in str(caught.value)


def test_run_never_reads_a_path_object():
    """If a future Cog handed run() a Path (its own download, a local file), the adapter refuses it unread."""
    import cog

    from cog_inputs import user_file_text
    from sd_core.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="^image: expected"):
        user_file_text(cog.Path("/etc/hostname"), "image")
    assert user_file_text(None, "mask") is None


# --- the real Cog server ---------------------------------------------------------------------------------------
def hostile_urls(port: int) -> list[tuple[str, str]]:
    """(value, text the prediction error must contain)."""
    return [
        (f"http://127.0.0.1:{port}/x.png", "SD_URL_ALLOWED_HOSTS"),
        (f"https://127.0.0.1:{port}/x.png", "loopback"),
        (f"http://[::ffff:127.0.0.1]:{port}/x.png", "SD_URL_ALLOWED_HOSTS"),
        (f"https://[::ffff:127.0.0.1]:{port}/x.png", "loopback"),
        (f"http://0x7f000001:{port}/x.png", ""),
        (f"https://0x7f000001:{port}/x.png", "ambiguous numeric host"),
        (f"https://user:{SECRET}@127.0.0.1:{port}/x.png", "credentials"),
        (f"https://127.0.0.1:{port}/x.png?X-Amz-Signature={SECRET}", "loopback"),
        (f"http://127.0.0.1:{port}/x.png?X-Amz-Signature={SECRET}&token={SECRET}", "SD_URL_ALLOWED_HOSTS"),
        ("/etc/hostname", "expected an image file"),
        ("file:///etc/hostname", "expected an image file"),
    ]


@pytest.mark.parametrize("field", ["image", "mask"])
def test_hostile_image_urls_fail_naming_the_field_without_any_connection(cog_server, listener, field):
    base = {**FAST, "image": data_uri(png())} if field == "mask" else dict(FAST)
    for value, reason in hostile_urls(listener.port):
        before = listener.connections
        response = cog_server.post_prediction({"input": {**base, field: value}})
        assert listener.connections == before, f"{value}: Cog or the engine connected to the listener"
        if response.status_code == 422:  # refused by the server's schema check, before the worker
            assert ["body", "input", field] in [item["loc"] for item in response.json()["detail"]], response.text
            shown = response.text
        else:
            prediction = response.json()
            assert prediction["status"] == "failed", (value, prediction.get("status"))
            assert f"{field}: " in prediction["error"], (value, prediction["error"])  # Cog prefixes its own words
            assert reason in prediction["error"].split(f"{field}: ", 1)[1], (value, prediction["error"])
            assert "Traceback" not in prediction["error"]
            shown = json.dumps({k: v for k, v in prediction.items() if k != "input"})  # input: the user's own echo
        for secret in (SECRET, "X-Amz-Signature", "/etc/hostname"):
            assert secret not in shown, (value, shown[:2000])
    log = cog_server.log_text()
    for secret in (SECRET, "X-Amz-Signature"):
        assert secret not in log, log[-3000:]


def test_data_uri_init_image_and_mask_still_work(cog_server):
    mask = Image.new("L", (72, 64), 0)
    mask.paste(255, (0, 0, 36, 64))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    for extra in ({"image": data_uri(png((72, 64)))},
                  {"image": data_uri(png((72, 64))), "mask": data_uri(buffer.getvalue())}):
        prediction = cog_server.predict({**FAST, "strength": 0.5, **extra})
        assert prediction["status"] == "succeeded", prediction.get("error")
        output = base64.b64decode(prediction["output"][0].split(",", 1)[1])
        assert Image.open(io.BytesIO(output)).size == (72, 64)


def test_allowed_host_url_is_fetched_by_sd_core(cog_server, listener):
    """localhost is on SD_URL_ALLOWED_HOSTS: the listener's PNG is fetched (once, by sd_core) and used as init image."""
    before = listener.connections
    prediction = cog_server.predict({**FAST, "strength": 0.5, "image": f"http://localhost:{listener.port}/x.png"})
    assert prediction["status"] == "succeeded", prediction.get("error")
    output = base64.b64decode(prediction["output"][0].split(",", 1)[1])
    assert Image.open(io.BytesIO(output)).size == (72, 64)  # the listener's image size, not the 64x64 default
    assert listener.connections == before + 1


def test_unreachable_image_url_error_shows_no_query_string_or_credentials(cog_server):
    """Cog's own download error echoed the whole URL; sd_core's names the URL without its query string."""
    from tests.fixtures.cog_server import free_port

    url = f"http://localhost:{free_port()}/x.png?X-Amz-Signature={SECRET}"  # allowed host, nothing listening
    prediction = cog_server.predict({**FAST, "image": url})
    assert prediction["status"] == "failed"
    assert "image: " in prediction["error"] and "/x.png?…" in prediction["error"], prediction["error"]
    shown = json.dumps({k: v for k, v in prediction.items() if k != "input"}) + cog_server.log_text()
    assert SECRET not in shown and "X-Amz-Signature" not in shown
