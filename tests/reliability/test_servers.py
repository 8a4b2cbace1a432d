"""Both adapters' real servers under hostile use: the bad-input corpus and schemathesis (Cog's own /openapi.json),
concurrent jobs with different models and LoRAs (RunPod, concurrency 4), a real out-of-memory inside the RunPod
worker, and recognizable fake secrets in the servers' environment that must never show up in logs, errors or
outputs. One Cog server and one RunPod worker for the module; each answers a normal request after the abuse."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.fixtures.cog_server import start_cog_server
from tests.fixtures.runpod_server import start_runpod_server
from tests.reliability.test_inputs import A1111, BOMB_HEADER, BOMB_REAL, IMAGE, MASK_32, NATIVE, TRUNCATED

REPO = Path(__file__).resolve().parents[2]
FAST = {"prompt": "a red fox in the snow", "num_inference_steps": 2}
FAKE = {  # recognizable values: none of them may ever be printed, logged or returned
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000001",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-SECRET-d41d8cd98f00b204",
    "HF_TOKEN": "hf_FAKEtokenDoNotLog0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEtokenDoNotLog0123456789",
}
WEBHOOK_TOKEN = "whsec-FAKE-webhook-token-7f3a9"


class _Hooks(BaseHTTPRequestHandler):
    """Receives Cog webhooks and RunPod progress posts (their URLs carry a secret token)."""

    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        with contextlib.suppress(ValueError):
            self.received.append({"path": self.path, "body": json.loads(body)})

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hooks():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def captured() -> list[str]:
    """Every response body the servers gave in this module: scanned for secrets at the end."""
    return []


@pytest.fixture(scope="module")
def secrets(s3_server) -> dict[str, str]:
    return {**FAKE, "BUCKET_SECRET_ACCESS_KEY": s3_server.secret_key, "webhook token": WEBHOOK_TOKEN}


@pytest.fixture(scope="module")
def lora_bucket(s3_server, tiny_bucket) -> str:
    """A bucket holding a LoRA: requests naming it with s3:// reach the store with the (fake) AWS credentials."""
    bucket = s3_server.make_bucket("userloras")
    lora = tiny_bucket / "loras" / "tiny-sd15-peft.safetensors"
    s3_server.client().upload_file(str(lora), bucket, "style.safetensors")
    return bucket


def common_env(tiny_bucket, s3_server, cache: Path) -> dict[str, str]:
    return {
        **FAKE, "SD_WEIGHTS_URI": str(tiny_bucket), "SD_MODELS_DIR": str(REPO / "models"), "SD_CACHE_DIR": str(cache),
        "SD_S3_ENDPOINT_URL": s3_server.endpoint_url, "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "MALLOC_ARENA_MAX": "2",
        # One intra-op thread: with OpenMP threads spinning on an oversubscribed 2-core machine, a 50 ms tiny-model
        # step was seen to take up to 15 s; the servers' answers must not depend on the neighbours' load.
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def cog(tiny_bucket, s3_server, lora_bucket, tmp_path_factory):
    env = {**common_env(tiny_bucket, s3_server, tmp_path_factory.mktemp("cog-cache")), "COG_MAX_CONCURRENCY": "2",
           "SD_USER_S3_BUCKETS": lora_bucket,  # s3:// user URLs may read this bucket only
           "SD_MAX_PIXELS": str(64 * 64 * 2)}  # generated requests stay small: bigger ones are refused, fast
    with start_cog_server(env, log_dir=tmp_path_factory.mktemp("cog-reliability")) as server:
        body, _ = server.wait_for_status("READY", "SETUP_FAILED", timeout=240)
        assert body["status"] == "READY", body
        yield server


@pytest.fixture(scope="module")
def runpod(tiny_bucket, s3_server, hooks, lora_bucket, tmp_path_factory):
    outputs = s3_server.make_bucket("outputs")
    env = {
        **common_env(tiny_bucket, s3_server, tmp_path_factory.mktemp("runpod-cache")),
        "SD_USER_S3_BUCKETS": lora_bucket,  # s3:// user URLs may read this bucket only (not the outputs bucket)
        "SD_CONCURRENCY": "4", "SD_PROGRESS_INTERVAL_S": "0",
        "BUCKET_ENDPOINT_URL": f"{s3_server.endpoint_url}/{outputs}", "BUCKET_ACCESS_KEY_ID": s3_server.access_key,
        "BUCKET_SECRET_ACCESS_KEY": s3_server.secret_key,
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{hooks.url}/progress?id=$ID&token={WEBHOOK_TOKEN}",
    }
    with start_runpod_server(env, log_dir=tmp_path_factory.mktemp("runpod-reliability")) as server:
        yield server


def cog_predict(cog, inputs, captured) -> requests.Response:
    deadline = time.monotonic() + 30
    while True:  # 409: both slots still busy (a slot frees a moment after its answer); Replicate retries too
        response = cog.post_prediction({"input": inputs})
        if response.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    captured.append(response.text)
    return response


def cog_message(response: requests.Response) -> str:
    """The text a Replicate user sees for a refused input: the 422 details or the failed prediction's error."""
    if response.status_code == 422:
        return json.dumps(response.json()["detail"])
    assert response.status_code == 200, (response.status_code, response.text[:500])
    body = response.json()
    assert body["status"] == "failed", body.get("status")
    return body["error"]


def runpod_job(runpod, job_input, captured) -> dict:
    # json.dumps, not requests' json=: NaN/Infinity go over the wire as Python's JSON writes them.
    response = runpod.session.post(f"{runpod.url}/runsync", data=json.dumps({"input": job_input}),
                                   headers={"Content-Type": "application/json"}, timeout=300)
    if response.status_code == 422:  # the SDK's own request model refuses it (the input is not an object)
        job = {"status": "FAILED", "error": "input: " + response.text}
    else:
        response.raise_for_status()
        job = response.json()
    captured.append(json.dumps(job))
    return job


def image_of(runpod_output: dict) -> np.ndarray:
    first = runpod_output["images"][0]
    data = base64.b64decode(first["image"]) if "image" in first else requests.get(first["url"], timeout=30).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# --- the corpus through Cog ---------------------------------------------------------------------------------------
def to_cog(payload) -> dict | None:
    """A native payload as Cog inputs (None when Cog's own types cannot carry it)."""
    if not isinstance(payload, dict):
        return None
    inputs = {}
    for key, value in payload.items():
        if key in ("image", "mask"):
            if not isinstance(value, str) or "://" in value:
                return None  # Cog itself would download URLs (or refuse non-strings): not our code path
            inputs[key] = value if value.startswith("data:") else f"data:image/png;base64,{value}"
        elif key == "loras":
            if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)):
                return None
            spec = dict(value[0])
            inputs["lora_weights"] = spec.pop("source", None)
            if "scale" in spec:
                inputs["lora_scale"] = spec.pop("scale")
            if spec:
                return None
        else:
            inputs[key] = value
    # JSON has no NaN/Infinity: send them as text, which a number field refuses just the same.
    return {k: str(v) if isinstance(v, float) and not np.isfinite(v) else v for k, v in inputs.items()}


COG_EXTRA = [  # Cog-only shapes and inputs
    ({"lora_weights": "file:///etc/passwd"}, "lora_weights"),
    ({"lora_weights": "s3://some-bucket/../../x.safetensors"}, "lora_weights"),
    ({"lora_weights": "tiny-style", "lora_scale": 99}, "lora_scale"),
    ({"lora_weights": ""}, "lora_weights"),
    ({"image": "data:image/png;base64," + BOMB_HEADER}, "image"),
    ({"image": "data:image/png;base64," + IMAGE, "mask": "data:image/png;base64," + MASK_32}, "mask"),
]


def test_bad_input_corpus_through_cog(cog, captured, reliability_tally):
    cases = [(to_cog(p), f) for p, f in NATIVE if to_cog(p) is not None and f != "steps_typo"] + COG_EXTRA
    platform = 0
    for inputs, field in cases:
        message = cog_message(cog_predict(cog, {**FAST, **inputs}, captured))
        if field in ("image", "mask") and message.startswith("Input validation error: Invalid base64"):
            platform += 1  # Cog decodes data URIs of file inputs itself, before predict.py: its message, its words
            continue
        # Cog's LoRA inputs are lora_weights/lora_scale; errors found past Cog's own checks say `loras`.
        names = ("lora_weights", "lora_scale", "loras") if field.startswith("lora") else (field,)
        assert any(name in message for name in names), (inputs if len(str(inputs)) < 300 else field, message[:500])
        assert "internal error" not in message and "Traceback" not in message, message[:500]
    assert platform <= 2
    reliability_tally["bad-input cases run (hand-written, Cog server)"] += len(cases)
    # Cog drops unknown keys itself (its platform behaviour): an input with a typo still runs.
    assert cog_predict(cog, {**FAST, "steps_typo": 20}, captured).json()["status"] == "succeeded"
    for payload in ("not an object", ["a"]):
        response = cog.post_prediction({"input": payload})
        captured.append(response.text)
        assert response.status_code in (400, 422), response.text[:300]
    # {"input": null} is Cog's "no inputs": every default (what Replicate does too).
    body = cog_predict(cog, {**FAST, "seed": 3}, captured).json()
    assert body["status"] == "succeeded", body
    assert cog.health()["status"] == "READY"


def test_cog_file_inputs_never_read_local_files(cog, captured):
    """A file:// URL must not turn a server file into an init image (cog_inputs.py keeps file inputs as text)."""
    response = cog_predict(cog, {**FAST, "image": "file:///etc/hostname"}, captured)
    message = cog_message(response)
    assert "not a readable" not in message, message  # our decoder never saw the file's bytes
    assert "image: expected an image file" in message, message  # and the user is told which input is wrong


def fuzzing_schema(cog, folder: Path, max_steps: int) -> Path:
    """Cog's own /openapi.json, written to ``folder`` for schemathesis, with traffic kept on 127.0.0.1: file inputs
    (format uri) would make the worker fetch generated hosts, and LoRA URLs would make it resolve them (both have
    their own tests; here they are names and data only); at most ``max_steps`` denoising steps per request."""
    schema = cog.openapi().json()
    props = schema["components"]["schemas"]["Input"]["properties"]
    props.pop("image")
    props.pop("mask")
    props["lora_weights"]["pattern"] = r"^[A-Za-z0-9._-]{1,40}$"
    props["num_inference_steps"]["maximum"] = max_steps
    path = folder / "openapi.json"
    path.write_text(json.dumps(schema))
    return path


def test_schemathesis_against_cogs_own_openapi(cog, captured, reliability_tally, tmp_path):
    # Cost: a valid request runs a real generation on CPU. Fewer steps keep each under a second; the 150/151 bound
    # itself is in the hand-written corpus.
    path = fuzzing_schema(cog, tmp_path, max_steps=4)
    report = tmp_path / "report"
    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", str(path), "--url", cog.url,
         "--include-path", "/predictions", "--include-method", "POST", "--phases", "examples,coverage,fuzzing",
         "--max-examples", "25", "--checks", "not_a_server_error", "--seed", "7", "--workers", "2", "--no-shrink",
         "--request-timeout", "120", "--report", "har", "--report-dir", str(report), "--warnings", "off"],
        capture_output=True, text=True, timeout=400, cwd=tmp_path,  # its caches stay out of the repository
    )
    summary = re.search(r"(\d+) generated", done.stdout)
    assert summary, done.stdout[-3000:] + done.stderr[-2000:]
    cases = int(summary.group(1))
    har = json.loads(next(report.glob("har-*.json")).read_text())["log"]["entries"]
    statuses: dict[int, int] = {}
    for entry in har:
        status = entry["response"]["status"]
        statuses[status] = statuses.get(status, 0) + 1
        text = entry["response"]["content"].get("text", "")
        captured.append(text)
        assert status < 500, (entry["request"].get("postData", {}).get("text", "")[:300], text[:300])
        if status == 200 and '"failed"' in text:
            assert "internal error" not in text, text[:500]
    print(f"schemathesis: {cases} cases, {len(har)} requests, statuses {statuses}, "
          f"{time.monotonic() - started:.1f}s")
    assert done.returncode == 0, done.stdout[-3000:]
    assert set(statuses) <= {200, 400, 404, 405, 415, 422}, statuses
    reliability_tally["bad-input cases run (schemathesis, Cog server)"] += cases
    assert cog.health()["status"] == "READY"
    assert cog_predict(cog, {**FAST, "seed": 5}, captured).json()["status"] == "succeeded"


def test_cog_async_with_a_secret_webhook_url(cog, hooks, captured):
    webhook = f"{hooks.url}/cog-hook?token={WEBHOOK_TOKEN}"
    response = cog.start_async("rel-secret-1", {**FAST, "seed": 8}, webhook)
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = [h for h in _Hooks.received
                if h["path"].startswith("/cog-hook") and h["body"].get("status") == "succeeded"]
        if done:
            captured.append(json.dumps(done[0]["body"]))
            return
        time.sleep(0.1)
    raise AssertionError("no succeeded webhook")


def test_cog_lora_from_s3_with_wrong_credentials_names_the_problem_not_the_secret(cog, lora_bucket, captured):
    message = cog_message(cog_predict(cog, {**FAST, "lora_weights": f"s3://{lora_bucket}/style.safetensors"},
                                      captured))
    assert "loras: " in message and "credentials" in message and "SD_USER_S3_BUCKETS" not in message, message


def test_cog_s3_lora_outside_the_allow_list_is_refused_before_any_request(cog, s3_server, captured):
    private = s3_server.make_bucket("private")  # it exists and the worker's credentials could reach it
    message = cog_message(cog_predict(cog, {**FAST, "lora_weights": f"s3://{private}/style.safetensors?token=hush"},
                                      captured))
    # the policy's answer, not the store's (a request would have failed on the fake credentials instead)
    assert "loras: " in message and "SD_USER_S3_BUCKETS" in message and "rejected" not in message, message
    assert "hush" not in message


# --- the corpus through RunPod ------------------------------------------------------------------------------------
def test_bad_input_corpus_through_runpod(runpod, captured, reliability_tally):
    cases = NATIVE + A1111
    for payload, field in cases:
        job = runpod_job(runpod, payload, captured)
        assert job["status"] == "FAILED", (field, job.get("status"), str(job.get("output"))[:200])
        assert field in job["error"], (field, job["error"][:500])
        assert "internal error" not in job["error"] and "Traceback" not in job["error"], job["error"][:500]
    reliability_tally["bad-input cases run (hand-written, RunPod server)"] += len(cases)
    job = runpod_job(runpod, {**FAST, "seed": 3}, captured)
    assert job["status"] == "COMPLETED", job
    a1111_job = runpod_job(runpod, {"prompt": "a fox", "steps": 2, "seed": 3, "sampler_name": "Euler a"}, captured)
    assert a1111_job["status"] == "COMPLETED" and a1111_job["output"]["images"], a1111_job


def test_runpod_lora_from_s3_with_wrong_credentials(runpod, lora_bucket, captured):
    job = runpod_job(runpod, {**FAST, "loras": [{"source": f"s3://{lora_bucket}/style.safetensors"}]}, captured)
    assert job["status"] == "FAILED" and job["error"].startswith("loras:") and "credentials" in job["error"], job
    assert "SD_USER_S3_BUCKETS" not in job["error"], job  # allow-listed: the store itself was asked


def test_runpod_s3_urls_outside_the_allow_list_are_refused_before_any_request(runpod, s3_server, captured):
    private = s3_server.make_bucket("private")
    for job_input in ({**FAST, "loras": [{"source": f"s3://{private}/style.safetensors"}]},
                      {**FAST, "model": f"s3://{private}/model.safetensors"},
                      {**FAST, "embeddings": [{"name": "neg", "source": f"s3://{private}/neg.safetensors"}]}):
        job = runpod_job(runpod, job_input, captured)
        assert job["status"] == "FAILED" and "SD_USER_S3_BUCKETS" in job["error"], job
        assert "rejected" not in job["error"], job


# --- concurrency safety -------------------------------------------------------------------------------------------
CONCURRENT = [
    ("tiny-sd15", None, 101), ("tiny-sd15", "tiny-style", 101), ("tiny-sdxl", None, 102),
    ("tiny-sdxl", "tiny-xl-style", 102), ("tiny-sd15-single", None, 103), ("tiny-sd15", "tiny-style-kohya", 104),
    ("tiny-sd15", None, 105), ("tiny-sdxl", None, 106), ("tiny-sd15", "tiny-style", 107), ("tiny-sd15", None, 101),
]


def _job_input(model, lora, seed) -> dict:
    payload = {**FAST, "model": model, "seed": seed}
    if lora:
        payload["loras"] = [{"source": lora}]
    return payload


def test_concurrent_jobs_each_get_their_own_image(runpod, captured, reliability_tally):
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(CONCURRENT)) as pool:
        together = list(pool.map(lambda case: runpod_job(runpod, _job_input(*case), captured), CONCURRENT))
    print(f"concurrent: {len(CONCURRENT)} jobs in {time.monotonic() - started:.1f}s")
    assert all(job["status"] == "COMPLETED" for job in together), [j.get("error") for j in together]
    started = time.monotonic()
    alone = [runpod_job(runpod, _job_input(*case), captured) for case in CONCURRENT]
    print(f"alone: {len(CONCURRENT)} jobs in {time.monotonic() - started:.1f}s")
    images_together = [image_of(job["output"]) for job in together]
    images_alone = [image_of(job["output"]) for job in alone]
    for case, job, a, b in zip(CONCURRENT, together, images_together, images_alone, strict=True):
        assert job["output"]["model"] == case[0] and job["output"]["seed"] == case[2]
        assert np.abs(a - b).max() <= 2, f"{case}: concurrent image differs from the same job run alone"
    for i, a in enumerate(images_together):  # and nobody got somebody else's image
        for j, b in enumerate(images_alone):
            if CONCURRENT[i] != CONCURRENT[j] and a.shape == b.shape:
                assert np.abs(a - b).mean() > 1.0, (CONCURRENT[i], CONCURRENT[j])
    reliability_tally["concurrent jobs checked against the same job alone"] += len(CONCURRENT)


# --- memory -------------------------------------------------------------------------------------------------------
def _vm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_out_of_memory_in_the_runpod_worker_is_reported_and_survived(runpod, captured, reliability_tally):
    """A real allocation failure: the worker process gets an address-space limit (prlimit) a 1536x1536 img2img
    cannot fit in. The job fails with OutOfMemory's message; the same worker then serves normally."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1536, 1536, 3)).astype(np.uint8)).save(buffer, "PNG")
    big = {**FAST, "image": base64.b64encode(buffer.getvalue()).decode(), "strength": 0.5, "seed": 1}
    before = runpod_job(runpod, {**FAST, "seed": 12}, captured)
    pid = runpod.process.pid
    old = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (_vm_bytes(pid) + 384 * 2**20, old[1]))
    try:
        failed = runpod_job(runpod, big, captured)
        after = runpod_job(runpod, {**FAST, "seed": 12}, captured)
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, old)
    assert failed["status"] == "FAILED" and "ran out of memory" in failed["error"], failed
    assert after["status"] == "COMPLETED", after
    assert np.array_equal(image_of(after["output"]), image_of(before["output"]))
    reliability_tally["memory faults injected"] += 1
    reliability_tally["memory faults survived"] += 1


def test_bomb_images_over_http_are_refused_without_decoding(runpod, captured):
    started = time.monotonic()
    for image in (BOMB_HEADER, BOMB_REAL, TRUNCATED):
        job = runpod_job(runpod, {**FAST, "image": image}, captured)
        assert job["status"] == "FAILED" and job["error"].startswith("image:"), job
    assert time.monotonic() - started < 10


# --- secrets (last: scans what everything above produced) --------------------------------------------------------
def test_no_secret_in_any_log_error_or_output(cog, runpod, captured, secrets, hooks):
    texts = {"cog server log": cog.log_text(), "runpod worker log": runpod.log_text(),
             "responses": "\n".join(captured), "webhook bodies": json.dumps([h["body"] for h in _Hooks.received])}
    assert len(captured) > 50 and texts["cog server log"] and texts["runpod worker log"]
    for where, text in texts.items():
        for name, value in secrets.items():
            assert value not in text, f"{name} appears in the {where}"
    # The webhook token reached its receiver (so the scan above was not vacuous).
    assert any(WEBHOOK_TOKEN in h["path"] for h in _Hooks.received)
