"""A schedule's own sigmas for pipelines that take none (ControlNet img2img / inpaint): given to the scheduler."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def sigmas_on_scheduler(pipe, kwargs: dict, taken: frozenset[str]) -> Iterator[dict]:
    """The call's keyword arguments, with ``sigmas`` moved onto the scheduler where the pipeline would swallow them.

    diffusers' ControlNet img2img / inpaint pipelines take ``**kwargs`` (``taken``: the names their ``__call__``
    declares) and run ``scheduler.set_timesteps(num_inference_steps, device=device)``. For the duration of the call,
    that one set_timesteps of an EulerDiscreteScheduler (the only scheduler given sigmas) sets exactly these sigmas,
    as ``retrieve_timesteps(..., sigmas=...)`` does in the pipelines that take them; the strength trim that follows
    (``get_timesteps``) is the same code in both. Restored afterwards, whatever happens (the caller holds the GPU
    lock, so no other call sees it). Anything else: ``kwargs`` unchanged (check_taken refuses what stays swallowed).
    """
    from diffusers import EulerDiscreteScheduler

    scheduler, sigmas = pipe.scheduler, kwargs.get("sigmas")
    if sigmas is None or "sigmas" in taken or not isinstance(scheduler, EulerDiscreteScheduler):
        yield kwargs
        return
    steps = len(sigmas) - 1
    if kwargs.get("num_inference_steps") != steps:  # the sigma path already sets the step count: a bug otherwise
        raise RuntimeError(f"{len(sigmas)} sigmas for num_inference_steps {kwargs.get('num_inference_steps')}")
    original = scheduler.set_timesteps
    own = vars(scheduler).get("set_timesteps")  # an instance attribute already there (none normally)
    calls = []

    def set_timesteps(num_inference_steps=None, device=None, **rest):
        if num_inference_steps != steps or rest or calls:
            raise RuntimeError(f"{type(pipe).__name__} set {num_inference_steps} timesteps ({rest}), expected "
                               f"{steps} once")
        calls.append(num_inference_steps)
        return original(device=device, sigmas=sigmas)

    scheduler.set_timesteps = set_timesteps
    try:
        yield {key: value for key, value in kwargs.items() if key != "sigmas"}
        if not calls:  # the pipeline never set its timesteps: the sigmas would have been dropped
            raise RuntimeError(f"{type(pipe).__name__} did not call its scheduler's set_timesteps")
    finally:
        if own is None:
            del scheduler.set_timesteps  # the class's method again
        else:
            scheduler.set_timesteps = own
