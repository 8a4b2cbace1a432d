"""Supply chain: pickle checkpoints are refused unless SD_ALLOW_PICKLE=1 — and that switch really loads one through
the same loader path; a pickle disguised as .safetensors is refused with a clear error, not loaded."""

from __future__ import annotations

import dataclasses
import io
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from sd_core.errors import SDError, UnsafeCheckpoint
from sd_core.schema import GenerationRequest
from sd_core.settings import REPO_ROOT

REQUEST = GenerationRequest(prompt="a red fox in the snow", seed=5, num_inference_steps=2)


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"))


@pytest.fixture(scope="module")
def pickled(tiny_bucket, tmp_path_factory):
    """tiny-sd15's single file re-saved as an A1111-style .ckpt (pickle) and as a pickle named .safetensors, with
    manifests for both next to the repository's."""
    folder = tmp_path_factory.mktemp("pickled")
    state = load_file(tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors")
    torch.save({"state_dict": state}, folder / "tiny-sd15.ckpt")
    shutil.copy(folder / "tiny-sd15.ckpt", folder / "disguised.safetensors")
    models = folder / "models"
    models.mkdir()
    base = yaml.safe_load((REPO_ROOT / "models" / "tiny-sd15-single.yaml").read_text())
    for name, file in (("tiny-ckpt", "tiny-sd15.ckpt"), ("tiny-disguised", "disguised.safetensors"),
                       ("tiny-sd15-single", None)):
        data = dict(base, name=name, config_uri=str(tiny_bucket / "tiny-sd15" / "config") + "/")
        data["uri"] = str(folder / file) if file else str(tiny_bucket / "tiny-sd15" / "tiny-sd15.safetensors")
        (models / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return models


@pytest.fixture
def engine_for(engine_settings, pickled):
    from sd_core.engine import Engine

    def make(**changes):
        return Engine(dataclasses.replace(engine_settings, models_dir=pickled, max_batch_images=1, **changes))

    return make


def test_pickle_checkpoint_is_refused_by_default(engine_for):
    with pytest.raises(UnsafeCheckpoint, match=r"^model: tiny-sd15.ckpt: pickle checkpoints .* SD_ALLOW_PICKLE=1"):
        engine_for().generate(REQUEST.model_copy(update={"model": "tiny-ckpt"}))


def test_the_unsafe_switch_really_loads_a_pickle_checkpoint(engine_for):
    engine = engine_for(allow_pickle=True)
    from_pickle = engine.generate(REQUEST.model_copy(update={"model": "tiny-ckpt"}))
    from_safetensors = engine.generate(REQUEST.model_copy(update={"model": "tiny-sd15-single"}))
    assert np.array_equal(pixels(from_pickle), pixels(from_safetensors))


def test_a_pickle_disguised_as_safetensors_is_refused_clearly(engine_for):
    engine = engine_for()
    with pytest.raises(SDError) as info:
        engine.generate(REQUEST.model_copy(update={"model": "tiny-disguised"}))
    assert "disguised.safetensors" in str(info.value) and "Traceback" not in str(info.value), str(info.value)
    assert engine.generate(REQUEST.model_copy(update={"model": "tiny-sd15-single"})).images  # the worker goes on
