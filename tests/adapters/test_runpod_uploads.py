"""Result delivery (sd_core/uploads.py): output bucket configuration, uploads to the local S3 server, size limit."""

from __future__ import annotations

import pytest
import requests

from sd_core.errors import InvalidRequest, UploadError
from sd_core.schema import GeneratedImage
from sd_core.settings import Settings
from sd_core.uploads import OutputBucket, Uploader, check_inline_size, inline_images, output_bucket
from tests.fixtures.runpod_server import free_port


def settings(**env) -> Settings:
    return Settings.from_env(env)


def test_no_bucket_settings_means_inline_base64():
    assert output_bucket(settings()) is None
    image = GeneratedImage(data=b"\x89PNG-bytes", mime_type="image/png", extension="png", seed=1, width=8, height=8)
    assert inline_images([image]) == ["iVBORy1ieXRlcw=="]


@pytest.mark.parametrize(
    ("env", "bucket", "prefix", "endpoint", "region"),
    [
        # RunPod's convention: the bucket is the endpoint URL's first path segment.
        ({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9000/out"}, "out", "", "http://127.0.0.1:9000", None),
        ({"BUCKET_ENDPOINT_URL": "https://acc.r2.cloudflarestorage.com/imgs/sd/runs/"}, "imgs", "sd/runs",
         "https://acc.r2.cloudflarestorage.com", None),
        ({"BUCKET_ENDPOINT_URL": "https://my-bucket.s3.eu-west-1.amazonaws.com"}, "my-bucket", "",
         "https://s3.eu-west-1.amazonaws.com", "eu-west-1"),
        # The project's own setting names bucket and prefix; the endpoint comes from BUCKET_ENDPOINT_URL or
        # SD_S3_ENDPOINT_URL.
        ({"SD_OUTPUT_URI": "s3://results/sd/"}, "results", "sd", None, None),
        ({"SD_OUTPUT_URI": "s3://results", "SD_S3_ENDPOINT_URL": "http://minio:9000"}, "results", "",
         "http://minio:9000", None),
        ({"SD_OUTPUT_URI": "s3://results/a", "BUCKET_ENDPOINT_URL": "http://minio:9000/other"}, "results", "a",
         "http://minio:9000", None),
    ],
)
def test_output_bucket_from_settings(env, bucket, prefix, endpoint, region):
    target = output_bucket(settings(**env))
    assert (target.bucket, target.prefix, target.endpoint_url, target.region) == (bucket, prefix, endpoint, region)


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9000"}, "BUCKET_ENDPOINT_URL: names no bucket"),
        ({"BUCKET_ENDPOINT_URL": "ftp://host/b"}, "BUCKET_ENDPOINT_URL: must be an http(s):// URL"),
        ({"SD_OUTPUT_URI": "https://host/b"}, "SD_OUTPUT_URI: must look like s3://bucket/prefix"),
        ({"SD_OUTPUT_URI": "s3://b", "BUCKET_ACCESS_KEY_ID": "id-only"}, "credentials: BUCKET_ACCESS_KEY_ID and"),
        ({"SD_OUTPUT_URI": "s3://b", "SD_OUTPUT_URL_TTL_S": "700000"}, "SD_OUTPUT_URL_TTL_S: must be between"),
    ],
)
def test_bad_output_settings_are_named(env, field):
    with pytest.raises(UploadError) as caught:
        output_bucket(settings(**env))
    assert str(caught.value).startswith(field)


def test_secrets_stay_out_of_reprs():
    s = settings(BUCKET_ENDPOINT_URL="http://h/b", BUCKET_ACCESS_KEY_ID="AKIDSECRETID", BUCKET_SECRET_ACCESS_KEY="shh")
    target = output_bucket(s)
    for text in (repr(s), repr(target), target.describe()):
        assert "AKIDSECRETID" not in text and "shh" not in text


def images(n: int = 2) -> list[GeneratedImage]:
    return [GeneratedImage(data=f"image {i}".encode() * 100, mime_type="image/webp", extension="webp", seed=40 + i,
                           width=8, height=8) for i in range(n)]


def test_upload_returns_presigned_urls_that_download_the_images(s3_server):
    bucket = s3_server.make_bucket("out")
    target = output_bucket(settings(
        BUCKET_ENDPOINT_URL=f"{s3_server.endpoint_url}/{bucket}/runs", BUCKET_ACCESS_KEY_ID=s3_server.access_key,
        BUCKET_SECRET_ACCESS_KEY=s3_server.secret_key, SD_OUTPUT_URL_TTL_S="600",
    ))
    sent = images(3)
    urls = Uploader(target).upload(sent, "job/../42")
    assert len(urls) == 3
    for url, image, index in zip(urls, sent, range(3), strict=True):
        assert url.startswith(f"{s3_server.endpoint_url}/{bucket}/runs/job_.._42/{index}-{image.seed}.webp?")
        assert "X-Amz-Expires=600" in url
        response = requests.get(url, timeout=10)
        assert response.status_code == 200 and response.content == image.data
        assert response.headers["Content-Type"] == "image/webp"
    # Without the signature the object is private.
    assert requests.get(urls[0].split("?")[0], timeout=10).status_code == 403


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"secret_access_key": "wrong-secret-value"}, "SignatureDoesNotMatch"),
        ({"access_key_id": "unknownkeyid"}, "InvalidAccessKeyId"),
        ({"endpoint_url": "http://127.0.0.1:{closed_port}"}, "cannot reach the output bucket endpoint"),
        ({"endpoint_url": "{https}"}, "TLS certificate of the output bucket endpoint"),  # (its CA not trusted)
    ],
)
def test_upload_failures_are_clear_and_leak_no_secret(s3_server, change, reason):
    change = {k: v.format(closed_port=free_port(), https=s3_server.https_endpoint_url) for k, v in change.items()}
    values = {"bucket": s3_server.make_bucket("out"), "endpoint_url": s3_server.endpoint_url,
              "access_key_id": s3_server.access_key, "secret_access_key": s3_server.secret_key, **change}
    with pytest.raises(UploadError) as caught:
        Uploader(OutputBucket(**values)).upload(images(1), "job1")
    message = str(caught.value)
    assert message.startswith("output: ") and "s3://" in message and reason in message
    assert values["secret_access_key"] not in message and s3_server.access_key not in message


def test_inline_size_limit_names_the_way_out():
    check_inline_size(900_000, settings(SD_MAX_RESPONSE_MB="1"))
    with pytest.raises(InvalidRequest) as caught:
        check_inline_size(1_500_000, settings(SD_MAX_RESPONSE_MB="1"))
    message = str(caught.value)
    assert message.startswith("output: the result is 1.50 MB of base64 images, over this worker's limit of 1 MB")
    assert "SD_MAX_RESPONSE_MB" in message and "BUCKET_ENDPOINT_URL" in message
