"""The RunPod worker with an output bucket (RunPod's BUCKET_* convention) on the local S3 server: presigned URLs.

One server for the module; its result limit is tiny (SD_MAX_RESPONSE_MB=0.001) to show that it only applies to
inline base64 results.
"""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image

from sd_core.outputs import read_parameters
from tests.fixtures.runpod_server import start_runpod_server

FAST = {"prompt": "a red fox in the snow", "num_inference_steps": 2, "width": 64, "height": 64}
PREFIX = "runpod-out"


@pytest.fixture(scope="module")
def output_bucket(s3_server) -> str:
    return s3_server.make_bucket("results")


@pytest.fixture(scope="module")
def server(runpod_weights_env, s3_server, output_bucket, tmp_path_factory):
    env = {
        **runpod_weights_env,
        "BUCKET_ENDPOINT_URL": f"{s3_server.endpoint_url}/{output_bucket}/{PREFIX}",
        "BUCKET_ACCESS_KEY_ID": s3_server.access_key,
        "BUCKET_SECRET_ACCESS_KEY": s3_server.secret_key,
        "SD_MAX_RESPONSE_MB": "0.001",
    }
    with start_runpod_server(env, log_dir=tmp_path_factory.mktemp("runpod-bucket")) as server:
        yield server


def download(url: str) -> tuple[bytes, Image.Image]:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, response.text[:500]
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return response.content, image


def test_native_job_returns_presigned_urls_of_the_uploaded_images(server, s3_server, output_bucket):
    job = server.runsync({**FAST, "num_outputs": 3, "width": 72, "seed": 500})
    assert job["status"] == "COMPLETED", job.get("error")
    output = job["output"]
    assert len(output["images"]) == 3 and output["timings"]["upload_s"] >= 0
    client = s3_server.client()
    for index, entry in enumerate(output["images"]):
        assert "image" not in entry and entry["seed"] == 500 + index
        key = f"{PREFIX}/{job['id']}/{index}-{entry['seed']}.png"
        assert urlsplit(entry["url"]).path == f"/{output_bucket}/{key}" and "X-Amz-Signature=" in entry["url"]
        data, image = download(entry["url"])
        assert image.size == (72, 64) and entry["mime_type"] == "image/png"
        assert f"Seed: {entry['seed']}" in read_parameters(data)
        # The URL serves exactly the object the worker stored.
        assert client.get_object(Bucket=output_bucket, Key=key)["Body"].read() == data


def test_a1111_job_gets_urls_in_images(server):
    job = server.runsync({"prompt": "a boat", "steps": 2, "width": 64, "height": 64, "batch_size": 2, "seed": 8})
    assert job["status"] == "COMPLETED", job.get("error")
    images = job["output"]["images"]
    assert len(images) == 2
    assert [download(url)[1].size for url in images] == [(64, 64), (64, 64)]


def test_logs_hold_neither_the_secret_nor_presigned_urls(server, s3_server):
    assert server.runsync(FAST)["status"] == "COMPLETED"
    log = server.log_text()
    assert "outputs: uploaded to s3://" in log
    assert s3_server.secret_key not in log
    assert "X-Amz-Signature" not in log  # RUNPOD_LOG_LEVEL=INFO: the SDK does not log job outputs
