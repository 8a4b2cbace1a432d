"""Per-model precision and memory options: the family's CUDA dtype (FLUX: bf16), fp8 weight-only quantization of
the denoiser (torchao) and model CPU offload, chosen by a manifest's ``memory:`` or the SD_QUANTIZE / SD_OFFLOAD
settings (docs/models.md says what each costs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .device import _DTYPES, Placement
from .errors import ManifestError
from .manifests import ModelManifest
from .settings import Settings

log = logging.getLogger("sd_core.memory_options")

OFFLOADS = ("none", "model")
QUANTIZATIONS = ("none", "fp8")


@dataclass(frozen=True)
class MemoryPlan:
    """How one model is placed: its dtype, whether its denoiser is quantized to fp8, whether it is CPU-offloaded."""

    dtype: torch.dtype
    quantize: str = "none"
    offload: str = "none"


def memory_plan(manifest: ModelManifest, settings: Settings, placement: Placement) -> MemoryPlan:
    """The plan for ``manifest`` on ``placement``: the manifest's ``memory:`` first, then the settings.

    ManifestError (naming the option) for an unknown value, and for fp8 without CUDA or without torchao installed:
    a model configured to need them is not loaded in another way silently. Offload on CPU is a no-op (the weights
    are in RAM already), logged.
    """
    quantize = (manifest.memory.quantize or settings.quantize or "none").lower()
    offload = (manifest.memory.offload or settings.offload or "none").lower()
    if quantize not in QUANTIZATIONS:
        raise ManifestError(f"SD_QUANTIZE: unknown value {quantize!r}; valid: {', '.join(QUANTIZATIONS)}")
    if offload not in OFFLOADS:
        raise ManifestError(f"SD_OFFLOAD: unknown value {offload!r}; valid: {', '.join(OFFLOADS)}")
    dtype = placement.dtype
    family = manifest.family
    if placement.is_cuda and settings.dtype.lower() == "auto" and family.cuda_dtype:
        dtype = _DTYPES[family.cuda_dtype]  # FLUX overflows in fp16: bf16 unless SD_DTYPE says otherwise
    if quantize == "fp8":
        if not placement.is_cuda:
            raise ManifestError(f"{manifest.name}: fp8 quantization (memory.quantize / SD_QUANTIZE) needs a CUDA "
                                "GPU; this worker runs on CPU: set it to none")
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise ManifestError(f"{manifest.name}: fp8 quantization (memory.quantize / SD_QUANTIZE) needs torchao, "
                                "which is not installed (pip install 'sd-serverless[fp8]' or torchao)") from None
    if offload == "model" and not placement.is_cuda:
        log.info("%s: model CPU offload has no effect on a CPU worker", manifest.name)
        offload = "none"
    return MemoryPlan(dtype=dtype, quantize=quantize, offload=offload)


def place(pipe, plan: MemoryPlan, family, placement: Placement) -> None:
    """Quantize the pipeline's denoiser if planned, then move it to the device, or offload it to the CPU."""
    if plan.quantize == "fp8":
        import torchao.quantization as tq

        denoiser = getattr(pipe, family.denoiser).to(placement.device)  # quantized on the GPU, where it runs
        config = tq.Float8WeightOnlyConfig() if hasattr(tq, "Float8WeightOnlyConfig") else tq.float8_weight_only()
        tq.quantize_(denoiser, config)
    if plan.offload == "model":
        pipe.enable_model_cpu_offload(device=placement.device)
    else:
        pipe.to(placement.device)
