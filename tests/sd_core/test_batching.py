"""Micro-batching through the public Engine API: same images as alone, and no request fails its batch-mates."""

import io
import threading

import numpy as np
import pytest
from PIL import Image

from sd_core.errors import Cancelled
from sd_core.schema import GenerationRequest

PROMPTS = ["a red fox", "a blue whale", "an old lighthouse", "a bowl of ramen"]


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def run_concurrently(engine, requests, **kwargs_per_index):
    """Start all requests at once from threads; return results (or exceptions) in order."""
    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def worker(index):
        barrier.wait()
        extra = {k: v[index] for k, v in kwargs_per_index.items()}
        try:
            results[index] = engine.generate(requests[index], **extra)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[index] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.fixture(scope="module")
def batching_engine(engine_settings):
    import dataclasses

    from sd_core.engine import Engine

    return Engine(dataclasses.replace(engine_settings, max_batch_images=8, batch_wait_ms=300))


@pytest.mark.parametrize("scheduler", [None, "DPM++ SDE Karras"])  # the model's default; a Brownian-noise sampler
def test_concurrent_requests_batch_and_match_running_alone(batching_engine, engine, scheduler):
    requests = [GenerationRequest(prompt=p, seed=10 + i, scheduler=scheduler) for i, p in enumerate(PROMPTS)]
    batched = run_concurrently(batching_engine, requests)
    assert all(not isinstance(r, Exception) for r in batched), batched
    assert max(r.timings["batch_size"] for r in batched) > 1, "nothing was batched"
    for request, result in zip(requests, batched, strict=True):
        alone, again = engine.generate(request), engine.generate(request)
        assert result.seeds == alone.seeds
        # The guarantee: alone, the same request gives the same pixels every time; batched, kernels whose results
        # depend on the batch size may move a few pixels by one or two levels (never more).
        assert np.array_equal(pixels(alone), pixels(again))
        assert np.abs(pixels(result) - pixels(alone)).max() <= 2


def test_empty_and_non_empty_negative_prompts_are_not_batched_together(batching_engine, engine):
    requests = [GenerationRequest(prompt="a", seed=1, model="tiny-sdxl", negative_prompt=n) for n in ("", "blur")]
    results = run_concurrently(batching_engine, requests)
    assert all(r.timings["batch_size"] == 1 for r in results)
    assert np.array_equal(pixels(results[0]), pixels(engine.generate(requests[0])))


def test_incompatible_requests_are_not_batched_together(batching_engine):
    requests = [GenerationRequest(prompt="a", seed=1, width=64), GenerationRequest(prompt="a", seed=1, width=96)]
    results = run_concurrently(batching_engine, requests)
    assert [r.images[0].width for r in results] == [64, 96]
    assert all(r.timings["batch_size"] == 1 for r in results)


def test_a_cancelled_request_does_not_cancel_its_batch_mates(batching_engine):
    requests = [GenerationRequest(prompt=p, seed=1) for p in PROMPTS[:3]]
    results = run_concurrently(batching_engine, requests, should_cancel=[None, lambda: True, None])
    assert isinstance(results[1], Cancelled)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)


def test_a_failing_request_does_not_fail_its_batch_mates(batching_engine):
    def explode(done, total):
        raise RuntimeError("progress sink broke")

    requests = [GenerationRequest(prompt=p, seed=1) for p in PROMPTS[:3]]
    results = run_concurrently(batching_engine, requests, on_step=[None, explode, None])
    assert isinstance(results[1], RuntimeError)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)


def test_batching_off_switch(make_engine):
    engine = make_engine(max_batch_images=1)
    assert engine.batcher is None
    results = run_concurrently(engine, [GenerationRequest(prompt=p, seed=1) for p in PROMPTS[:2]])
    assert all(r.timings["batch_size"] == 1 for r in results)
