"""Checkpoint file rules shared by models, LoRAs and the safety checker: pickle refused, safetensors checked."""

from __future__ import annotations

import string
from pathlib import Path

from .errors import UnsafeCheckpoint
from .settings import Settings

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # dropped from A1111 / ComfyUI titles
_HEX = frozenset(string.hexdigits)


def title_to_name(title: str) -> str:
    """A weights file as A1111 and ComfyUI title it ("my-model.safetensors [3f1c2a]") -> the manifest name
    ("my-model"): the trailing short hash and the file extension dropped ("" when nothing is left)."""
    name = title.strip()
    if name.endswith("]"):  # " [3f1c2a]": A1111's short hash of the file
        head, bracket, digits = name[:-1].rpartition("[")
        if bracket and digits and _HEX.issuperset(digits):
            name = head.rstrip()
    if name.lower().endswith(WEIGHT_FILE_SUFFIXES):
        name = name[: name.rindex(".")]
    return name


def refuse_pickle(path: Path, settings: Settings) -> None:
    """Pickle checkpoints can run arbitrary code when loaded: refuse them unless SD_ALLOW_PICKLE is on."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not settings.allow_pickle:
        raise UnsafeCheckpoint(
            f"{path.name}: pickle checkpoints ({', '.join(sorted(PICKLE_SUFFIXES))}) can execute code when loaded "
            "and are refused; convert it to .safetensors (or set SD_ALLOW_PICKLE=1 if you trust the file)",
            field="model",
        )
    if path.suffix.lower() == ".safetensors" and not settings.allow_pickle and not is_readable_safetensors(path):
        raise UnsafeCheckpoint(
            f"{path.name}: not a valid .safetensors file (a pickle under that name, or damaged); refused",
            field="model",
        )


def refuse_pickle_folder(folder: Path, settings: Settings) -> None:
    """A diffusers folder (a model, a VAE, a ControlNet) loaded with ``use_safetensors=True``: a component folder's
    pickle files beside its .safetensors are never loaded and are ignored (hub repos ship ``pytorch_model.bin``,
    ``openvino_model.bin`` next to them); a component with pickle weights ONLY is refused unless SD_ALLOW_PICKLE.
    Every .safetensors is checked to be one (not a pickle under that name)."""
    if settings.allow_pickle:
        return
    by_folder: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}:
            if any(part.startswith(".") for part in path.relative_to(folder).parts[:-1]):
                continue  # huggingface_hub's own .cache folder in a local dir
            by_folder.setdefault(path.parent, []).append(path)
    for files in by_folder.values():
        tensors = [path for path in files if path.suffix.lower() == ".safetensors"]
        for path in tensors:
            refuse_pickle(path, settings)
        if not tensors:
            refuse_pickle(files[0], settings)


def is_readable_safetensors(path: Path) -> bool:
    """Whether the file's safetensors header parses (reads the header only, not the tensors)."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        return False


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors checkpoint (header only): what ``families.detect_architecture`` reads."""
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as checkpoint:
        return list(checkpoint.keys())


def checkpoint_shapes(path: Path) -> dict[str, list[int]]:
    """The tensor names and shapes of a .safetensors checkpoint (header only): what ``ModelFamily.variant`` reads."""
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as checkpoint:
        return {key: list(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}
