"""Flow-matching families (SD3, FLUX): one sampler, flow-matching Euler built from the model's own scheduler config."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest, quote
from .base import EULER, ModelFamily


class FlowMatchFamily(ModelFamily):
    """A family whose one sampler is ``FlowMatchEulerDiscreteScheduler`` (A1111's ``Euler``, its ``Automatic``
    schedule), its shift and dynamic-shifting config kept; no CLIP skip.

    diffusers' FlowMatchEulerDiscreteScheduler also takes Karras / exponential / beta sigmas, but computes them from
    its own shifted last sigma, not from the model's sigma range as A1111 does: not the same schedule, so only the
    plain (Uniform) Euler is offered.
    """

    def clip_skip_limit(self, pipe) -> tuple[int, int] | None:
        return None

    def schedulers(self) -> tuple[str, ...]:
        return (EULER,)

    def build_scheduler(self, name: str, base_config: dict[str, Any], steps: int | None = None):
        """The model's own FlowMatchEulerDiscreteScheduler."""
        if name != EULER:  # the engine checks schedulers() first; a defensive check for direct callers
            raise InvalidRequest(f"{quote(name)} does not run {self.name} models; valid: {EULER}", field="scheduler")
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(base_config)

    def sigma_scheduler(self, base_config: dict[str, Any]):
        """The model's FlowMatchEulerDiscreteScheduler for a request's own ``sigmas``: its shift (fixed or dynamic),
        terminal stretch and sigma conversions turned off, so ``set_timesteps(sigmas=...)`` runs exactly the given
        sigmas (then 0) with timesteps sigma x 1000, the schedule the request already holds shifted."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        flags = {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None, "use_karras_sigmas": False,
                 "use_exponential_sigmas": False, "use_beta_sigmas": False, "invert_sigmas": False,
                 "stochastic_sampling": False}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(base_config, **flags)
        for key, value in flags.items():  # from_config drops keywords it does not know: fail loudly instead
            if scheduler.config.get(key) != value:
                raise RuntimeError(f"FlowMatchEulerDiscreteScheduler ignored {key}={value!r}")
        return scheduler

    def check_sigmas(self, req, model: str) -> None:
        """InvalidRequest for a sigma above 1 (pure noise): a flow-matching noise level is 0 to 1."""
        if any(sigma > 1 for sigma in req.sigmas):
            raise InvalidRequest(f"{quote(model)} is a {self.name} model, whose sigmas are flow-matching noise levels: "
                                 "each must be at most 1", field="sigmas")

    def call_kwargs(self, job) -> dict[str, Any]:
        """The base's, with a request's own ``sigmas`` as given (run by ``sigma_scheduler``, which appends 0)."""
        kwargs = super().call_kwargs(job)
        if job.request.sigmas is not None:
            kwargs["sigmas"] = list(job.request.sigmas)
        return kwargs
