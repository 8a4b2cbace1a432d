"""Upscalers (sd_core/upscalers.py) and upscale-only jobs (sd_core/upscale_job.py) on the tiny ESRGAN twins."""

from __future__ import annotations

import base64
import dataclasses
import io
import types

import numpy as np
import pytest
import torch
from PIL import Image

from sd_core.errors import InvalidRequest, UnsafeCheckpoint
from sd_core.upscale_job import from_extras, parse_upscale, run_upscale
from sd_core.upscalers import Upscalers, import_spandrel


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(result) -> Image.Image:
    return Image.open(io.BytesIO(result.image.data))


def upscalers_with(engine, **changes) -> Upscalers:
    return Upscalers(dataclasses.replace(engine.settings, **changes), engine.placement)


@pytest.mark.parametrize("scale", [2, 4])
def test_spandrel_loads_the_tiny_twins_as_esrgan(tiny_bucket, scale):
    model = import_spandrel().ModelLoader().load_from_file(tiny_bucket / f"tiny-upscalers/tiny-esrgan-x{scale}"
                                                                         ".safetensors")
    assert (model.architecture.id, model.scale, model.purpose) == ("ESRGAN", scale, "SR")


def test_names_as_a1111_lists_them(engine):
    assert engine.upscalers.names() == ["None", "Lanczos", "Nearest", "tiny-esrgan-x2", "tiny-esrgan-x4"]
    assert engine.upscalers.scale("tiny-esrgan-x4") == 4 and engine.upscalers.scale("Lanczos") is None


@pytest.mark.parametrize("name,method", [("Lanczos", Image.Resampling.LANCZOS), ("Nearest", Image.Resampling.NEAREST)])
def test_lanczos_and_nearest_equal_pils_resize(engine, name, method):
    image = noise(24, 16)
    [out] = engine.upscalers.upscale(name, [image], 72, 40)
    assert out.tobytes() == image.resize((72, 40), method).tobytes()
    assert engine.upscalers.upscale("None", [image], 24, 16)[0] is image


def test_model_upscaler_equals_a_bare_spandrel_call_and_tiles_change_nothing(engine, tiny_bucket):
    image = noise(20, 28, seed=1)
    model = import_spandrel().ModelLoader().load_from_file(tiny_bucket / "tiny-upscalers/tiny-esrgan-x2.safetensors")
    with torch.inference_mode():
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
        bare = (model(pixels)[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    whole = upscalers_with(engine, upscaler_tile=0).upscale("tiny-esrgan-x2", [image], 40, 56)[0]
    assert np.array_equal(np.asarray(whole), bare)
    tiled = upscalers_with(engine, upscaler_tile=8, upscaler_tile_overlap=24).upscale("tiny-esrgan-x2", [image], 40,
                                                                                       56)[0]
    assert np.abs(np.asarray(tiled, dtype=int) - bare.astype(int)).max() <= 1
    seams = upscalers_with(engine, upscaler_tile=8, upscaler_tile_overlap=0).upscale("tiny-esrgan-x2", [image], 40,
                                                                                      56)[0]
    assert np.abs(np.asarray(seams, dtype=int) - bare.astype(int)).max() > 1  # without context, tiles show


def test_model_passes_then_lanczos_to_the_exact_size(engine):
    image = noise(16, 16, seed=2)
    [x2] = engine.upscalers.upscale("tiny-esrgan-x2", [image], 32, 32)
    [x3] = engine.upscalers.upscale("tiny-esrgan-x2", [image], 48, 40)  # two x2 passes (64x64), then Lanczos
    assert x2.size == (32, 32) and x3.size == (48, 40)
    assert x2.tobytes() != image.resize((32, 32), Image.Resampling.LANCZOS).tobytes()  # the model ran
    with pytest.raises(InvalidRequest, match="upscaler: unknown upscaler 'ESRGAN_4x'; valid: None, Lanczos"):
        engine.upscalers.upscale("ESRGAN_4x", [image], 64, 64)


@pytest.mark.parametrize("scale", [2, 4])
def test_extra_single_image_gives_exactly_the_scaled_size(engine, scale):
    request = from_extras({"image": b64(noise(64, 48)), "upscaler_1": f"tiny-esrgan-x{scale}",
                           "upscaling_resize": scale})
    result = run_upscale(engine, request)
    assert decoded(result).size == (64 * scale, 48 * scale)
    assert result.parameters == f"Postprocess upscale by: {scale}, Postprocess upscaler: tiny-esrgan-x{scale}"


def test_extras_resize_to_with_crop_and_a_blended_second_upscaler(engine):
    image = noise(64, 32)
    request = from_extras({"image": b64(image), "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 96,
                           "upscaler_1": "Lanczos", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.5})
    out = decoded(run_upscale(engine, request))
    assert out.size == (96, 96)  # covered (192x96), then the centre 96x96, as A1111
    first, second = (image.resize((192, 96), method) for method in (Image.Resampling.LANCZOS,
                                                                     Image.Resampling.NEAREST))
    expected = Image.blend(first, second, 0.5).crop((48, 0, 144, 96))
    assert out.tobytes() == expected.tobytes()


def test_upscale_requests_refused_with_clear_errors(engine):
    with pytest.raises(InvalidRequest, match="gfpgan_visibility: face restoration is not supported"):
        from_extras({"image": "x", "gfpgan_visibility": 0.5})
    with pytest.raises(InvalidRequest, match="upscaling_resize: "):
        from_extras({"image": "x", "upscaling_resize": 0})
    with pytest.raises(InvalidRequest, match="width and height: give both"):
        parse_upscale({"image": "x", "width": 64})
    big = parse_upscale({"image": b64(noise(64, 64)), "scale": 16, "upscaler": "Lanczos"})
    tight = dataclasses.replace(engine.settings, max_pixels=512 * 512)
    with pytest.raises(InvalidRequest, match="scale: the upscaled image would be 1024x1024"):
        run_upscale(types.SimpleNamespace(settings=tight, upscalers=engine.upscalers), big)


def test_pickle_upscaler_refused_without_the_switch(engine, tiny_bucket, tmp_path):
    state = import_spandrel().ModelLoader().load_state_dict_from_file(tiny_bucket / "tiny-upscalers/"
                                                                                    "tiny-esrgan-x2.safetensors")
    torch.save(dict(state), tmp_path / "pickled-x2.pth")
    models = tmp_path / "models"
    models.mkdir()
    (models / "_upscalers.yaml").write_text(f"upscalers:\n  - name: pickled\n    uri: {tmp_path}/pickled-x2.pth\n"
                                            "    scale: 2\n")
    image = noise(8, 8)
    with pytest.raises(UnsafeCheckpoint, match="pickle checkpoints"):
        upscalers_with(engine, models_dir=models).upscale("pickled", [image], 16, 16)
    [out] = upscalers_with(engine, models_dir=models, allow_pickle=True).upscale("pickled", [image], 16, 16)
    assert out.tobytes() == engine.upscalers.upscale("tiny-esrgan-x2", [image], 16, 16)[0].tobytes()
