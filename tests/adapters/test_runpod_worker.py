"""The RunPod Worker in process: output built off the event loop from the effective request, errors mapped once."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from sd_core.errors import WorkerUnhealthy
from sd_core.settings import Settings


@pytest.fixture
def handler():
    import handler

    return handler


def make_worker(handler, engine, settings: Settings):
    """A Worker around an existing engine (the cold start, tested on the real server, is skipped)."""
    worker = object.__new__(handler.Worker)
    worker.engine, worker.settings, worker.uploader = engine, settings, None
    return worker


def run_job(worker, job_input: dict) -> tuple[dict, threading.Thread]:
    async def run():
        return await worker.handler({"id": "j1", "input": job_input}), threading.current_thread()

    return asyncio.run(run())


def test_a1111_response_and_size_check_run_off_the_event_loop(handler, engine, engine_settings, monkeypatch):
    threads: list[threading.Thread] = []
    to_response, dumps = handler.a1111.to_response, json.dumps

    def recording(original):
        def wrapper(*args, **kwargs):
            threads.append(threading.current_thread())
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(handler.a1111, "to_response", recording(to_response))
    monkeypatch.setattr(handler.json, "dumps", recording(dumps))
    output, loop_thread = run_job(make_worker(handler, engine, engine_settings),
                                  {"prompt": "a fox", "steps": 2, "cfg_scale": 5, "seed": 9})
    assert set(output) == {"images", "parameters", "info"}, output
    assert threads and loop_thread not in threads
    # The values used come from the result's effective request: the model's defaults filled in.
    manifest = engine.catalog.get("tiny-sd15")
    info = json.loads(output["info"])
    assert (info["steps"], info["cfg_scale"], info["seed"], info["sd_model_name"]) == (2, 5, 9, "tiny-sd15")
    assert output["parameters"]["sampler_name"] == manifest.defaults.scheduler
    assert (info["width"], info["height"]) == (manifest.defaults.width, manifest.defaults.height)


class FailingEngine:
    """Stands in for a device fault, which a CPU test cannot cause."""

    def __init__(self):
        self.error: Exception = RuntimeError("boom at /opt/secret/path")
        self.calls = 0

    def generate(self, request, **kwargs):
        self.calls += 1
        raise self.error


def test_errors_map_to_runpod_outputs_and_a_device_error_refreshes_the_worker(handler):
    engine = FailingEngine()
    worker = make_worker(handler, engine, Settings())
    output, _ = run_job(worker, {"prompt": "x"})
    assert output == {"error": "internal error (RuntimeError); see the worker logs"}
    engine.error = WorkerUnhealthy("device error, this worker must be replaced: CUDA error")
    unhealthy = {"error": "device error, this worker must be replaced: CUDA error", "refresh_worker": True}
    assert run_job(worker, {"prompt": "x"})[0] == unhealthy
    # Every later job fails the same way, without reaching the engine.
    assert run_job(worker, {"prompt": "x"})[0] == unhealthy and engine.calls == 2
