"""ComfyUI's scheduler formulas (comfy/samplers.py) on a model sampling's sigma table: the sigmas a KSampler runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """What ComfyUI's schedulers read of a model sampling: its sigma table (ascending: the sigma of each training
    timestep, ``sigmas``), ``sigma(t)`` of a (fractional) timestep, and the timesteps of its largest and smallest
    sigma (``timestep(sigma_max)``, ``timestep(sigma_min)``)."""

    table: tuple[float, ...]
    sigma: Callable[[float], float]
    t_max: float
    t_min: float

    @property
    def sigma_max(self) -> float:
        return self.table[-1]

    @property
    def sigma_min(self) -> float:
        return self.table[0]


def _ramp(steps: int) -> list[float]:
    """numpy/torch linspace(0, 1, steps)."""
    return [i / (steps - 1) if steps > 1 else 0.0 for i in range(steps)]


def _linspace(start: float, end: float, count: int) -> list[float]:
    return [start + (end - start) * i / (count - 1) if count > 1 else start for i in range(count)]


def simple(s: Sampling, steps: int) -> list[float]:
    """Every len/steps-th table entry from the top (the index truncated), then 0."""
    every = len(s.table) / steps
    return [s.table[-(1 + int(x * every))] for x in range(steps)] + [0.0]


def ddim_uniform(s: Sampling, steps: int) -> list[float]:
    """Table entries 1, 1 + len // steps, 1 + 2 (len // steps), ... below len, from the highest down, then 0 (so
    maybe another count than ``steps``, and not from the top sigma)."""
    picked, x = [], 1
    zero = math.isclose(s.table[1], 0, abs_tol=1e-5)
    every = max(len(s.table) // (steps + 1 if zero else steps), 1)
    while x < len(s.table):
        picked.append(s.table[x])
        x += every
    return picked[::-1] + ([] if zero else [0.0])


def beta(s: Sampling, steps: int, alpha: float = 0.6, b: float = 0.6) -> list[float]:
    """Whole table indices at the beta(alpha, b) quantiles 1, 1 - 1/steps, ... (rounded half to even, as numpy's
    rint), consecutive repeats dropped (maybe fewer steps), then 0."""
    from scipy.stats import beta as beta_distribution

    last = len(s.table) - 1
    picked: list[int] = []
    for q in [1 - i / steps for i in range(steps)]:
        index = int(round(float(beta_distribution.ppf(q, alpha, b)) * last))
        if not picked or picked[-1] != index:
            picked.append(index)
    return [s.table[i] for i in picked] + [0.0]


def karras(s: Sampling, steps: int, rho: float = 7.0) -> list[float]:
    top, bottom = s.sigma_max ** (1 / rho), s.sigma_min ** (1 / rho)
    return [(top + r * (bottom - top)) ** rho for r in _ramp(steps)] + [0.0]


def exponential(s: Sampling, steps: int) -> list[float]:
    high, low = math.log(s.sigma_max), math.log(s.sigma_min)
    return [math.exp(high + r * (low - high)) for r in _ramp(steps)] + [0.0]


def normal(s: Sampling, steps: int) -> list[float]:
    """Timesteps evenly spaced from t_max to t_min, their sigmas; when the last is 0, one step more instead of the
    appended 0."""
    zero = math.isclose(s.sigma(s.t_min), 0, abs_tol=1e-5)
    times = _linspace(s.t_max, s.t_min, steps + 1 if zero else steps)
    return [s.sigma(t) for t in times] + ([] if zero else [0.0])


def sgm_uniform(s: Sampling, steps: int) -> list[float]:
    """steps + 1 timesteps evenly spaced from t_max to t_min, the last dropped, their sigmas, then 0."""
    times = _linspace(s.t_max, s.t_min, steps + 1)[:-1]
    return [s.sigma(t) for t in times] + [0.0]


def kl_optimal(s: Sampling, steps: int) -> list[float]:
    """tan of atan(sigma_max) .. atan(sigma_min) evenly spaced, then 0 (ComfyUI divides by steps - 1: one step is a
    NaN there; ValueError here)."""
    if steps < 2:
        raise ValueError("kl_optimal needs at least 2 steps")
    high, low = math.atan(s.sigma_max), math.atan(s.sigma_min)
    return [math.tan(r * low + (1 - r) * high) for r in _ramp(steps)] + [0.0]


def linear_quadratic(s: Sampling, steps: int, threshold: float = 0.025) -> list[float]:
    """Mochi's schedule: 1 - t, t rising linearly to ``threshold`` over the first steps // 2 steps, then
    quadratically to 1; times sigma_max (ends in 0)."""
    if steps == 1:
        return [s.sigma_max, 0.0]
    linear = steps // 2
    quadratic = steps - linear
    gap = linear - threshold * steps
    a = gap / (linear * quadratic ** 2)
    b = threshold / linear - 2 * gap / quadratic ** 2
    c = a * linear ** 2
    ts = [i * threshold / linear for i in range(linear)] + [a * i * i + b * i + c for i in range(linear, steps)]
    return [(1.0 - t) * s.sigma_max for t in ts] + [0.0]


SCHEDULES: dict[str, Callable[[Sampling, int], list[float]]] = {
    "simple": simple, "sgm_uniform": sgm_uniform, "karras": karras, "exponential": exponential,
    "ddim_uniform": ddim_uniform, "beta": beta, "normal": normal, "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}


def schedule(sampling: Sampling, scheduler: str, steps: int) -> list[float]:
    """ComfyUI's ``scheduler`` sigmas for ``steps`` steps on ``sampling``, ending in 0; ValueError for an unknown
    scheduler (or kl_optimal's one step)."""
    if scheduler not in SCHEDULES:
        raise ValueError(scheduler)
    return SCHEDULES[scheduler](sampling, steps)
