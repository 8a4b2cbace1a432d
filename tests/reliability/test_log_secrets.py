"""Log redaction at DEBUG: urllib3, requests and botocore log request lines and headers; after
``sd_core.log_secrets.install()`` no token, signature or secret key reaches any log record."""

from __future__ import annotations

import logging
import re
import threading
from http.server import ThreadingHTTPServer

import pytest

from sd_core import log_secrets, storage
from sd_core.settings import Settings
from sd_core.user_downloads import download_user_url
from tests.fixtures.http_files import FileHandler

SECRET = "hush-0123456789abcdef"
BODY = b"x" * 1000


class _Handler(FileHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_file(BODY)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def scrubbed_debug_logs(caplog):
    """Everything at DEBUG, with the worker's redaction installed; the process's logging is restored afterwards."""
    factory = logging.getLogRecordFactory()
    caplog.set_level(logging.DEBUG)
    # the libraries' loggers as they are at import (an earlier test's logging setup, e.g. a dictConfig, may have
    # disabled them or raised their level: then nothing would be logged to scrub)
    libraries = [logging.getLogger(name) for name in log_secrets.LIBRARY_LOGGERS]
    saved = [(logger, logger.disabled, logger.level) for logger in libraries]
    for logger in libraries:
        logger.disabled, logger.level = False, logging.NOTSET
    log_secrets.install()
    yield caplog
    for logger, disabled, level in saved:
        logger.disabled, logger.level = disabled, level
    logging.setLogRecordFactory(factory)
    log_secrets._FACTORY_INSTALLED = False
    for name in log_secrets.LIBRARY_LOGGERS:
        for f in [f for f in logging.getLogger(name).filters if isinstance(f, log_secrets.ScrubSecrets)]:
            logging.getLogger(name).removeFilter(f)


def test_library_debug_logs_never_show_tokens_or_signatures(scrubbed_debug_logs, server, tmp_path):
    settings = Settings(url_allowed_hosts=("127.0.0.1",), cache_dir=tmp_path / "cache", fetch_retries=0)
    # a user URL with a token (urllib3 directly), an operator's presigned URL (requests + urllib3)
    assert download_user_url(f"{server}/lora.safetensors?token={SECRET}", field="loras", max_bytes=10_000,
                             settings=settings) == BODY
    presigned = (f"{server}/m.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAFAKE%2F20240101"
                 f"&X-Amz-Signature={SECRET}&X-Amz-Security-Token={SECRET}")
    assert storage.fetch(presigned, settings).read_bytes() == BODY
    logging.getLogger("urllib3.connectionpool").debug('%s://%s:%s "%s %s %s" %s %s', "https", "h", 443, "GET",
                                                       f"/x?token={SECRET}", "HTTP/1.1", 200, 5)
    text = scrubbed_debug_logs.text
    assert "/lora.safetensors?…" in text  # urllib3's request line was logged, without its query
    assert SECRET not in text and "AKIAFAKE" not in text, text


def test_botocore_debug_logs_never_show_signatures_or_keys(scrubbed_debug_logs, s3_env, s3_bucket, tmp_path):
    s3_env.client().put_object(Bucket=s3_bucket, Key="k.bin", Body=BODY)
    settings = Settings(cache_dir=tmp_path / "cache", s3_endpoint_url=s3_env.endpoint_url, fetch_retries=0)
    assert storage.fetch(f"s3://{s3_bucket}/k.bin", settings).read_bytes() == BODY
    text = scrubbed_debug_logs.text
    assert "botocore" in text and "Authorization" in text  # botocore did log its signed request
    assert s3_env.secret_key not in text and s3_env.access_key not in text, text
    assert not re.search(r"Signature[=:]\s*[0-9a-f]{16}", text), text
