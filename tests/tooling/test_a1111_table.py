"""docs/a1111.md's key table agrees with sd_core/a1111.py: one row per key; each status is what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sd_core import a1111, a1111_hires, a1111_inpaint, a1111_options
from sd_core.errors import InvalidRequest

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `([^`]+)` \| (both|txt2img|img2img) \| ([^|]+?) \| (.+) \|$")
STATUSES = {"honoured", "refused", "default only", "ignored", "IGNORED (known gap)"}
OTHER_OVERRIDES = "override_settings.*"
# the override_settings keys the code reads
OVERRIDE_KEYS = {a1111.CHECKPOINT_KEY, a1111.CLIP_SKIP_KEY, "override_settings.sd_vae"}

# A value for each honoured key that must change the translated request (context: keys the value needs beside it).
HONOURED = {
    "prompt": "another prompt", "negative_prompt": "blurry", "seed": 5, "subseed": 5, "subseed_strength": 0.5,
    "sampler_name": "DDIM", "sampler_index": "DDIM", "batch_size": 2, "n_iter": 2, "steps": 3,
    "cfg_scale": 3.5, "width": 128, "height": 128, "eta": 0.5, "denoising_strength": 0.3,
    "override_settings": {"CLIP_stop_at_last_layers": 2}, "init_images": ["b3RoZXI="], "mask": "bWFzaw==",
    "scheduler": "Karras", "override_settings.sd_model_checkpoint": "tiny-sdxl.safetensors [0123abcd]",
    "override_settings.CLIP_stop_at_last_layers": 2, "tiling": True,
    "disable_extra_networks": True, "override_settings.sd_vae": "tiny-vae.safetensors", "enable_hr": True,
    "hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 3, "hr_resize_x": 128, "hr_resize_y": 128,
    "hr_sampler_name": "DDIM", "hr_scheduler": "Karras", "hr_prompt": "a dog", "hr_negative_prompt": "blurry",
    "hr_cfg": 3.0, "resize_mode": 1, "mask_blur": 8, "mask_blur_x": 8, "mask_blur_y": 8, "inpainting_fill": 2,
    "inpaint_full_res": False, "inpaint_full_res_padding": 32, "inpainting_mask_invert": 1,
    "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5,
}
HIRES_ON = {"enable_hr": True}
REFINER = {"refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.8}
REQUIRED_WITH_CONTEXT = {"refiner_switch_at": 0.8}
WITH_MASK = {"mask": "bWFzaw=="}
CONTEXT = {"scheduler": {"sampler_name": "Euler"}, "refiner_checkpoint": REFINER, "refiner_switch_at": REFINER,
           "hr_scheduler": {**HIRES_ON, "sampler_name": "Euler"},
           **{key: HIRES_ON for key in ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
                                        "hr_resize_y", "hr_sampler_name", "hr_prompt", "hr_negative_prompt", "hr_cfg",
                                        *a1111_hires.REFUSED_WITH_HIRES, *a1111_hires.DEFAULT_ONLY)},
           **{key: WITH_MASK for key in ("mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill",
                                         "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
                                         *a1111_inpaint.DEFAULT_ONLY)},
           "disable_extra_networks": {"prompt": "a fox <lora:ink:0.5>"}}
# Honoured keys that act on the response or refuse per entry rather than change the request: checked on their own.
NOT_IN_REQUEST = {"send_images", "alwayson_scripts"}
BASE = {a1111.TXT2IMG: {"prompt": "a fox"}, a1111.IMG2IMG: {"prompt": "a fox", "init_images": ["aW1hZ2U="]}}


def table() -> dict[str, tuple[str, str]]:
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in (REPO / "docs" / "a1111.md").read_text().splitlines():
        if match := ROW.match(line):
            rows.setdefault(match[1], []).append((match[2], match[3]))
    duplicated = sorted(key for key, found in rows.items() if len(found) > 1)
    assert duplicated == [], f"keys with more than one row: {duplicated}"
    return {key: found[0] for key, found in rows.items()}


ROWS = table()
ALL_KEYS = a1111.KNOWN_KEYS[a1111.TXT2IMG] | a1111.KNOWN_KEYS[a1111.IMG2IMG]


def endpoints(key: str) -> list[str]:
    key = key.split(".", 1)[0]
    return [endpoint for endpoint in (a1111.TXT2IMG, a1111.IMG2IMG) if key in a1111.KNOWN_KEYS[endpoint]]


def payload(endpoint: str, key: str, value) -> dict:
    body = {**BASE[endpoint], **CONTEXT.get(key, {})}
    if key.startswith("override_settings."):
        name = key.split(".", 1)[1]
        body["override_settings"] = {("samples_format" if name == "*" else name): value}
    else:
        body[key] = value
    return body


def translate(endpoint: str, body: dict):
    return a1111.to_request(a1111.A1111Call(endpoint, body)).model_dump()


def test_every_key_has_exactly_one_row():
    expected = ALL_KEYS | OVERRIDE_KEYS | {OTHER_OVERRIDES}
    assert set(ROWS) == expected, (sorted(expected - set(ROWS)), sorted(set(ROWS) - expected))
    assert {status for _, status in ROWS.values()} <= STATUSES


@pytest.mark.parametrize("key", sorted(ALL_KEYS))
def test_the_endpoint_column_is_where_the_key_is_known(key):
    known = endpoints(key)
    assert ROWS[key][0] == (known[0] if len(known) == 1 else "both")


def test_statuses_agree_with_the_codes_tables():
    refused = {*a1111.UNSUPPORTED, *a1111.UNSUPPORTED_SIZES, *a1111_hires.LEGACY_SIZES, *a1111_hires.REFUSED_WITH_HIRES}
    assert {key for key, (_, status) in ROWS.items() if status == "refused"} == refused
    default_only = {*a1111.SAMPLER_KNOB_DEFAULTS, *a1111_hires.DEFAULT_ONLY, *a1111_inpaint.DEFAULT_ONLY}
    assert {key for key, (_, status) in ROWS.items() if status == "default only"} == default_only


@pytest.mark.parametrize("key", sorted(k for k, (_, s) in ROWS.items() if s in ("refused", "default only")))
def test_refused_and_default_only_keys_fail_when_switched_on(key):
    for endpoint in endpoints(key):
        with pytest.raises(InvalidRequest, match=re.escape(key)):
            translate(endpoint, payload(endpoint, key, 7))


def without(endpoint: str, key: str, body: dict) -> dict:
    """``body`` without ``key`` (an override_settings.* key: without override_settings; a key the base needs: the
    base's value)."""
    top = key.split(".", 1)[0]
    body = {k: v for k, v in body.items() if k != top}
    if top in BASE[endpoint]:
        body[top] = BASE[endpoint][top]
    if top in REQUIRED_WITH_CONTEXT:  # a key its context cannot go without: compared with another value instead
        body[top] = REQUIRED_WITH_CONTEXT[top]
    return body


@pytest.mark.parametrize("key", sorted(k for k, (_, s) in ROWS.items() if s.lower().startswith("ignored")))
def test_ignored_keys_change_nothing(key):
    """An ignored row is only true while the code ignores the key: building it must update the row."""
    for endpoint in endpoints(key):
        body = payload(endpoint, key, 2)
        assert translate(endpoint, body) == translate(endpoint, without(endpoint, key, body)), (key, endpoint)


@pytest.mark.parametrize("key", sorted(k for k, (_, s) in ROWS.items() if s == "honoured" and k not in NOT_IN_REQUEST))
def test_honoured_keys_change_the_request(key):
    changed = []
    for endpoint in endpoints(key):
        if key in ("subseed_strength", "refiner_checkpoint", "refiner_switch_at") and endpoint == a1111.IMG2IMG:
            continue  # refused with an init image (the row says so)
        body = payload(endpoint, key, HONOURED[key])
        changed.append(translate(endpoint, body) != translate(endpoint, without(endpoint, key, body)))
    assert any(changed), key


def test_alwayson_scripts_rule():
    off = {"ADetailer": {"args": [False, {"ad_model": "face_yolov8n.pt"}]},
           "ControlNet": {"args": [{"enabled": False, "module": "canny"}]}}
    plain = translate(a1111.TXT2IMG, BASE[a1111.TXT2IMG])
    assert translate(a1111.TXT2IMG, {**BASE[a1111.TXT2IMG], "alwayson_scripts": off}) == plain
    with pytest.raises(InvalidRequest, match="alwayson_scripts.ADetailer: not supported"):
        translate(a1111.TXT2IMG, {**BASE[a1111.TXT2IMG], "alwayson_scripts": {"ADetailer": {"args": [True]}}})


def test_the_checks_can_fail(monkeypatch):
    with pytest.raises(InvalidRequest):  # a refused key documented as ignored
        test_ignored_keys_change_nothing("restore_faces")
    monkeypatch.setitem(HONOURED, "do_not_save_samples", True)
    with pytest.raises(AssertionError):  # an ignored key documented as honoured
        test_honoured_keys_change_the_request("do_not_save_samples")


@pytest.mark.parametrize("option", sorted(a1111_options.IMAGE_OPTION_DEFAULTS))
def test_image_changing_options_are_default_only(option):
    default = a1111_options.IMAGE_OPTION_DEFAULTS[option][0]
    body = payload(a1111.TXT2IMG, f"override_settings.{option}", default)
    assert translate(a1111.TXT2IMG, body) == translate(a1111.TXT2IMG, BASE[a1111.TXT2IMG])
    other = "something else" if isinstance(default, str) else (not default if isinstance(default, bool) else 7)
    with pytest.raises(InvalidRequest, match=re.escape(f"override_settings.{option}: only A1111's default")):
        translate(a1111.TXT2IMG, payload(a1111.TXT2IMG, f"override_settings.{option}", other))
