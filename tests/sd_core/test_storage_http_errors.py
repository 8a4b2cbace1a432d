"""http(s) fetch errors from requests (redirect loops...) are reported as fetch errors naming the URL, no query."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pytest

from sd_core.errors import FetchError
from sd_core.settings import Settings
from sd_core.storage import fetch
from tests.fixtures.http_files import FileHandler

BODY = b"x" * 4096


class ProbeThenLoop(FileHandler):
    """Answers the 1-byte size probe, then redirects every other GET to itself (requests: TooManyRedirects)."""

    def do_GET(self):
        if self.headers.get("Range") == "bytes=0-0":
            self.send_file(BODY)
            return
        self.send_response(302)
        self.send_header("Location", self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def loop_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ProbeThenLoop)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_redirect_loop_is_a_fetch_error_not_a_cache_error(loop_server, tmp_path):
    settings = Settings(cache_dir=tmp_path / "cache", fetch_retries=0, fetch_timeout_s=5.0,
                        models_dir=tmp_path / "models")
    with pytest.raises(FetchError) as caught:
        fetch(f"{loop_server}/weights.bin?X-Amz-Signature=sekrit", settings)
    message = str(caught.value)
    assert "TooManyRedirects" in message
    assert f"{loop_server}/weights.bin" in message
    assert "sekrit" not in message
    assert "SD_CACHE_DIR" not in message and "weights cache" not in message
