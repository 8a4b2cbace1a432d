"""The long opt-in soak (``pytest -m slow tests/reliability/test_soak.py -s``): the CI checks of the other reliability
modules, many times over — cold starts through a proxy that breaks a third of all responses, schemathesis with all
its phases against the Cog server, thousands of fuzzed inputs, and waves of concurrent RunPod jobs."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from sd_core import a1111
from sd_core.errors import FetchError, InvalidRequest
from sd_core.schema import GenerationRequest, parse_request
from tests.reliability import test_servers as _servers
from tests.reliability import test_storage as _storage
from tests.reliability.test_inputs import FIELDS, a1111_inputs, assert_clear, native_inputs
from tests.reliability.test_servers import CONCURRENT, _job_input, fuzzing_schema, image_of, runpod_job
from tests.reliability.test_storage import ALL_FAULTS, assert_cache_clean, faulty_settings, pixels

pytestmark = pytest.mark.slow
# The servers and the pinned S3 weights of the CI modules, as fixtures of this module too.
cog, runpod, captured, hooks = _servers.cog, _servers.runpod, _servers.captured, _servers.hooks
pinned = _storage.pinned

ROUNDS = 12


def test_soak_cold_starts_under_heavy_faults(pinned, s3_env, s3_fault_proxy, tiny_bucket, tmp_path, make_engine,
                                             reliability_tally):
    from sd_core.engine import Engine

    request = GenerationRequest(prompt="a red fox in the snow", seed=33, num_inference_steps=2)
    reference = pixels(make_engine(max_batch_images=1).generate(request))
    proxy = s3_fault_proxy
    proxy.stall_s = 2
    injected = restarts = 0
    errors: list[str] = []
    for round_ in range(ROUNDS):
        proxy.reset_counters()
        proxy.configure(probability=0.33, faults=tuple(ALL_FAULTS), seed=round_, path_pattern=None)
        cache = tmp_path / f"round-{round_}"
        settings = faulty_settings(pinned, proxy, cache, fetch_retries=6,
                                   preload_models=("tiny-sd15", "tiny-sd15-single"))
        for _attempt in range(5):  # a platform restarts a worker whose cold start failed; the cache keeps its work
            try:
                engine = Engine(settings)
                engine.preload()
                break
            except FetchError as exc:  # e.g. an object corrupted on both of its tries: refused, never loaded
                errors.append(str(exc))
                print(f"round {round_}: cold start failed cleanly: {exc}")
                assert pinned["base"] in str(exc), str(exc)  # names what could not be fetched
                assert_cache_clean(cache, tiny_bucket)
                restarts += 1
        else:
            raise AssertionError(f"round {round_}: no cold start succeeded in 5 attempts: {errors[-3:]}")
        assert np.array_equal(pixels(engine.generate(request)), reference), f"round {round_}"
        assert_cache_clean(cache, tiny_bucket)
        injected += proxy.injected
    print(f"soak: {ROUNDS} cold starts, {injected} faults injected, all survived or refused cleanly; "
          f"{restarts} cold starts needed a restart (FetchError), 0 corrupted loads")
    reliability_tally["storage faults injected (soak)"] += injected
    reliability_tally["cold starts restarted after a clean FetchError (soak)"] += restarts


@settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
@given(native_inputs)
def test_soak_fuzz_native(reliability_tally, data):
    reliability_tally["bad-input cases run (hypothesis soak)"] += 1
    try:
        parse_request(data)
    except InvalidRequest as exc:
        named = {str(k) or "''" for k in data} if isinstance(data, dict) else set()
        assert_clear(exc, {*FIELDS, "input", "width x height", "mask", *named})


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(a1111_inputs)
def test_soak_fuzz_a1111(reliability_tally, data):
    reliability_tally["bad-input cases run (hypothesis soak)"] += 1
    try:
        call = a1111.parse_call(data)
        if call is not None:
            a1111.to_request(call)
    except InvalidRequest as exc:
        assert str(exc) and "Traceback" not in str(exc)


def test_soak_schemathesis_all_phases(cog, captured, reliability_tally, tmp_path):
    path = fuzzing_schema(cog, tmp_path, max_steps=8)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", str(path), "--url", cog.url, "--exclude-path", "/shutdown",
         "--max-examples", "300", "--checks", "not_a_server_error", "--seed", "11", "--workers", "2",
         "--request-timeout", "120", "--warnings", "off"],
        capture_output=True, text=True, timeout=3600, cwd=tmp_path,
    )
    cases = int(re.search(r"(\d+) generated", done.stdout).group(1))
    print(f"schemathesis soak: {cases} cases")
    assert done.returncode == 0, done.stdout[-4000:]
    reliability_tally["bad-input cases run (schemathesis soak)"] += cases
    assert cog.health()["status"] == "READY"


def test_soak_concurrent_waves(runpod, captured, reliability_tally):
    alone = {case: image_of(runpod_job(runpod, _job_input(*case), captured)["output"]) for case in set(CONCURRENT)}
    started = time.monotonic()
    for wave in range(5):
        cases = CONCURRENT * 3
        with ThreadPoolExecutor(max_workers=len(cases)) as pool:
            jobs = list(pool.map(lambda case: runpod_job(runpod, _job_input(*case), captured), cases))
        for case, job in zip(cases, jobs, strict=True):
            assert job["status"] == "COMPLETED", (wave, case, job.get("error"))
            assert np.abs(image_of(job["output"]) - alone[case]).max() <= 2, (wave, case)
        reliability_tally["concurrent jobs checked against the same job alone"] += len(cases)
    print(f"concurrency soak: {5 * len(CONCURRENT) * 3} jobs in {time.monotonic() - started:.1f}s")
