"""Device, precision and speed switches: CUDA fp16/bf16 or CPU fp32/bf16, SDPA or xformers, torch.compile."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .settings import Settings

log = logging.getLogger("sd_core.device")

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    """Where and in which precision pipelines run."""

    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def choose_placement(settings: Settings) -> Placement:
    """SD_DEVICE/SD_DTYPE, with 'auto' meaning CUDA fp16 when a GPU is present, else CPU fp32."""
    want = settings.device.lower()
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SD_DEVICE=cuda but no CUDA device is available")
    device = torch.device(want)
    name = settings.dtype.lower()
    if name == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif name in _DTYPES:
        dtype = _DTYPES[name]
    else:
        raise RuntimeError(f"SD_DTYPE={settings.dtype!r}: use auto, float16, bfloat16 or float32")
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("float16 is slow and unsupported for some ops on CPU; using bfloat16")
        dtype = torch.bfloat16
    return Placement(device=device, dtype=dtype)


def optimize(pipe, settings: Settings, placement: Placement) -> None:
    """Apply attention backend and torch.compile to a freshly loaded pipeline (in place)."""
    if settings.attention == "xformers":
        if not placement.is_cuda:
            log.warning("SD_ATTENTION=xformers needs CUDA; keeping PyTorch SDPA attention")
        else:
            try:
                pipe.enable_xformers_memory_efficient_attention()
                log.info("attention: xformers")
            except Exception as exc:  # not installed, or no kernel for this GPU
                log.warning("xformers unavailable (%s); keeping PyTorch SDPA attention", exc)
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"  # the denoiser: UNet or DiT
    if placement.is_cuda and name == "unet":
        pipe.unet.to(memory_format=torch.channels_last)
    if settings.torch_compile:
        use_compile_cache(settings.compile_cache_dir)
        setattr(pipe, name, torch.compile(getattr(pipe, name),
                                          mode="max-autotune-no-cudagraphs" if placement.is_cuda else "default"))
        log.info("torch.compile enabled for the %s (first request pays the compile time)", name)


def use_compile_cache(folder) -> None:
    """SD_COMPILE_CACHE_DIR: torch.compile's Inductor and Triton caches in ``folder`` (a network volume: the next
    worker loads the compiled kernels instead of compiling). Variables the operator set themselves are kept."""
    if folder is None:
        return
    import os
    from pathlib import Path

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("SD_COMPILE_CACHE_DIR: cannot create the compile cache folder (%s); compiling without it",
                    exc.strerror)
        return
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    log.info("torch.compile caches: %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])


def free_memory(placement: Placement) -> None:
    """Release cached allocator blocks after an out-of-memory or an eviction."""
    import gc

    gc.collect()
    if placement.is_cuda:
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    # CUDA: "CUDA out of memory"; CPU: "DefaultCPUAllocator: can't allocate memory ... Error code 12".
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


def raise_device_failure(exc: BaseException, placement: Placement, out_of_memory: str, field: str) -> None:
    """For a failed call on the device: raise OutOfMemory(``out_of_memory``) after freeing the caches, or
    WorkerUnhealthy after an unrecoverable device error; return (the caller re-raises) for anything else."""
    from .errors import OutOfMemory, WorkerUnhealthy

    if is_out_of_memory(exc):
        free_memory(placement)
        raise OutOfMemory(out_of_memory, field=field) from None
    if is_fatal_device_error(exc):
        raise WorkerUnhealthy(f"device error, this worker must be replaced: {exc}") from exc


def total_memory_bytes(placement: Placement) -> int:
    """Memory the device has: GPU memory on CUDA, physical RAM on CPU."""
    if placement.is_cuda:
        return torch.cuda.get_device_properties(placement.device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def is_fatal_device_error(exc: BaseException) -> bool:
    """CUDA errors after which the context is unusable (the worker must be replaced, not reused)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("illegal memory access", "device-side assert", "cuda error: unspecified launch",
                                      "cublas_status_execution_failed", "ecc error")
    )
