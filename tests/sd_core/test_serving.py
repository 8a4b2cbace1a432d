"""sd_core.serving: one error mapping, cancellation at a step boundary, throttled progress, the effective request."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from sd_core.errors import InvalidRequest, SDError, WorkerUnhealthy
from sd_core.schema import GenerationRequest
from sd_core.serving import Server, StepProgress, rounded

SECRET = "X-Amz-Signature=topsecret"


def test_user_errors_pass_through_and_the_worker_stays_healthy():
    server = Server()
    invalid = InvalidRequest("must be a multiple of 8 (got 100)", field="width")
    assert server.user_error(invalid) is invalid
    assert str(server.user_error(invalid)) == "width: must be a multiple of 8 (got 100)"
    assert server.unhealthy is None


def test_unexpected_errors_become_a_short_message_with_the_traceback_in_the_logs(caplog):
    server = Server()
    try:
        raise KeyError(f"s3://bucket/key?{SECRET}")
    except KeyError as exc:
        with caplog.at_level(logging.ERROR, logger="sd_core.serving"):
            error = server.user_error(exc, "job j1")
    assert isinstance(error, SDError)
    assert str(error) == "internal error (KeyError); see the logs" and SECRET not in str(error)
    assert "job j1: unexpected error" in caplog.text and "Traceback" in caplog.text
    assert server.unhealthy is None


def test_worker_unhealthy_marks_the_worker_for_replacement():
    server = Server()
    fatal = WorkerUnhealthy("device error, this worker must be replaced: CUDA error: an illegal memory access")
    assert server.user_error(fatal) is fatal
    assert server.unhealthy == str(fatal)
    assert Server().unhealthy is None  # per worker, not per class


def test_progress_is_throttled_but_always_reports_the_last_step():
    sent = []
    progress = StepProgress(sent.append, interval=60)
    for step in range(1, 5):
        progress.step(step, 4)
    assert sent == [{"step": 1, "steps": 4, "percent": 25}, {"step": 4, "steps": 4, "percent": 100}]
    assert (progress.done, progress.total) == (4, 4)
    every = []
    unthrottled = StepProgress(every.append)
    for step in range(1, 4):
        unthrottled.step(step, 3)
    assert [update["step"] for update in every] == [1, 2, 3]


def test_rounded_keeps_counts_and_rounds_seconds():
    assert rounded({"total_s": 1.234567, "batch_size": 2}) == {"total_s": 1.2346, "batch_size": 2}


def test_generate_returns_the_effective_request(engine):
    server = Server()
    server.engine = engine
    result = asyncio.run(server.generate(GenerationRequest(prompt="a fox", num_inference_steps=2, seed=3)))
    effective = result.request
    assert effective is not None and effective.prompt == "a fox" and effective.seed == 3
    assert effective.model == result.model == "tiny-sd15"  # the model's defaults filled in
    assert (effective.width, effective.height) == (result.images[0].width, result.images[0].height)
    assert effective.num_inference_steps == 2 and effective.scheduler and effective.guidance_scale is not None


def test_cancel_stops_the_engine_at_the_next_step_before_the_cancellation_is_raised(engine, caplog):
    server = Server()
    server.engine = engine
    steps: list[int] = []
    progress = StepProgress(lambda update: steps.append(update["step"]))
    request = GenerationRequest(prompt="a fox", num_inference_steps=150, width=64, height=64, seed=1)

    async def cancel_while_denoising() -> int:
        task = asyncio.ensure_future(server.generate(request, progress, name="job c1"))
        deadline = time.monotonic() + 120
        while not steps and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert steps, "the engine never started denoising"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(steps)

    with caplog.at_level(logging.INFO, logger="sd_core.serving"):
        steps_at_cancel = asyncio.run(cancel_while_denoising())
    time.sleep(0.3)
    assert len(steps) == steps_at_cancel, "the engine kept denoising after the cancellation was raised"
    assert steps[-1] < 150
    assert f"job c1 cancelled: generation stopped after step {steps[-1]} of 150" in caplog.text
    assert server.unhealthy is None
    # The worker serves the next request normally.
    again = asyncio.run(server.generate(GenerationRequest(prompt="a fox", num_inference_steps=2, seed=1)))
    assert len(again.images) == 1


def test_worker_logging_never_shows_url_secrets(capsys):
    import logging

    from sd_core.serving import setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging()
    try:
        logging.getLogger("sd_core.lora").info("LoRA %s loaded", "https://u:PASSWORD@h/x.safetensors?X-Amz-Signature=SIG")
        try:
            raise ValueError("fetch failed: https://h/x?token=TOKEN")
        except ValueError:
            logging.getLogger("handler").exception("job 1: unexpected error")
        said = capsys.readouterr().err
    finally:  # hand logging back to pytest
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "https://h/x.safetensors?…" in said and "fetch failed: https://h/x?…" in said
    assert not any(secret in said for secret in ("PASSWORD", "SIG", "TOKEN"))
