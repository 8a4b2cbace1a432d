"""A1111 payloads (sd_core/a1111.py): recognising them, translating them, naming A1111's keys in errors."""

from __future__ import annotations

import pytest

from sd_core import a1111
from sd_core.errors import InvalidRequest

INIT = "iVBORw0KGgo="  # any string: images are decoded later, by the engine


@pytest.mark.parametrize(
    ("data", "endpoint"),
    [
        ({"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": {"prompt": "x"}}, "txt2img"),
        ({"api": {"method": "POST", "endpoint": "/sdapi/v1/img2img"}, "payload": {"init_images": [INIT]}}, "img2img"),
        ({"api": "txt2img", "prompt": "x"}, "txt2img"),
        ({"api": "/sdapi/v1/img2img", "init_images": [INIT]}, "img2img"),
        ({"prompt": "x", "steps": 20}, "txt2img"),
        ({"prompt": "x", "cfg_scale": 7}, "txt2img"),
        ({"prompt": "x", "init_images": [INIT], "denoising_strength": 0.5}, "img2img"),
    ],
)


def test_a1111_payloads_are_recognised(data, endpoint):
    call = a1111.parse_call(data)
    assert call is not None and call.endpoint == endpoint
    assert "api" not in call.payload


@pytest.mark.parametrize("data", [{"prompt": "x", "num_inference_steps": 4, "seed": 1}, {}, "text", None, [1]])


def test_native_inputs_are_not_a1111(data):
    assert a1111.parse_call(data) is None


def test_txt2img_translation():
    call = a1111.parse_call({
        "prompt": "a fox <lora:tiny-style:0.5>", "negative_prompt": "blur", "steps": 12, "cfg_scale": 5.5,
        "sampler_name": "DPM++ 2M", "scheduler": "Karras", "width": 96, "height": 64, "batch_size": 2, "n_iter": 3,
        "seed": -1, "override_settings": {"sd_model_checkpoint": "tiny-sdxl.safetensors [0123abcd]"},
        "send_images": True, "save_images": False, "restore_faces": False, "enable_hr": False, "styles": [],
    })
    request = a1111.to_request(call)
    assert request.prompt == "a fox <lora:tiny-style:0.5>"  # tags reach the engine, which resolves them
    assert (request.num_inference_steps, request.guidance_scale, request.scheduler) == (12, 5.5, "DPM++ 2M Karras")
    assert (request.width, request.height, request.num_outputs, request.seed) == (96, 64, 6, -1)
    assert request.model == "tiny-sdxl" and request.image is None


def test_variation_seed_translation():
    request = a1111.to_request(a1111.parse_call({"steps": 4, "seed": 3, "subseed": 9, "subseed_strength": 0.3,
                                                 "seed_resize_from_w": -1, "seed_resize_from_h": 0}))
    assert (request.seed, request.subseed, request.subseed_strength) == (3, 9, 0.3)
    defaults = a1111.to_request(a1111.parse_call({"steps": 4, "subseed": -1, "subseed_strength": 0}))
    assert (defaults.subseed, defaults.subseed_strength) == (-1, 0.0)  # A1111's defaults: no variation


@pytest.mark.parametrize(("sampler", "schedule", "expected"), [
    # A1111 1.9+: no schedule or "Automatic" is the sampler's own default schedule.
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),
    ("DPM++ 2M", None, "DPM++ 2M Karras"),
    ("DPM++ SDE", "automatic", "DPM++ SDE Karras"),
    ("DPM++ 2M SDE", "Automatic", "DPM++ 2M SDE Exponential"),
    ("DPM++ 2M SDE Heun", None, "DPM++ 2M SDE Heun Exponential"),
    ("Euler a", "Automatic", "Euler a"),
    ("Euler", "Automatic", "Euler"),
    ("UniPC", "Automatic", "UniPC"),
    ("k_dpmpp_2m", "Automatic", "DPM++ 2M Karras"),
    # The old combined names keep the schedule they spell.
    ("DPM++ 2M Karras", "Automatic", "DPM++ 2M Karras"),
    ("LMS Karras", None, "LMS Karras"),
    ("DPM++ 2M SDE Karras", "Karras", "DPM++ 2M SDE Karras"),
    # An explicit schedule applies to the sampler.
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "Exponential", "DPM++ 2M Exponential"),
    ("DPM++ SDE", "uniform", "DPM++ SDE"),
    ("Euler", "Karras", "Euler Karras"),
    ("Euler a", "Uniform", "Euler a"),
])


def test_sampler_and_schedule_translation(sampler, schedule, expected):
    payload = {"steps": 4, "sampler_name": sampler} | ({"scheduler": schedule} if schedule else {})
    assert a1111.to_request(a1111.parse_call(payload)).scheduler == expected


def test_img2img_translation_uses_a1111_default_strength():
    call = a1111.parse_call({"api": "img2img", "init_images": [INIT], "mask": INIT, "mask_blur": 4})
    request = a1111.to_request(call)
    assert request.image == INIT and request.mask == INIT and request.strength == 0.75
    assert request.mode == "inpaint"


def test_hires_translation():
    request = a1111.to_request(a1111.parse_call({
        "steps": 4, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 6, "enable_hr": True,
        "hr_resize_x": 1024, "hr_resize_y": 0, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 3,
        "hr_sampler_name": "Euler", "hr_scheduler": "", "hr_prompt": "", "hr_negative_prompt": "blur", "hr_cfg": 4,
        "hr_checkpoint_name": "Use same checkpoint", "hr_distilled_cfg": 3.5, "firstphase_width": 0,
    }))
    hires = request.hires
    assert (hires.width, hires.height, hires.upscaler, hires.steps) == (1024, 0, "Lanczos", 3)
    # hr_scheduler "" is the first pass's schedule type, applied to hr_sampler_name (as A1111)
    assert (hires.scheduler, hires.prompt, hires.negative_prompt, hires.guidance_scale) == ("Euler Karras", "",
                                                                                           "blur", 4)
    assert hires.denoising_strength == 0.75  # A1111's API default for txt2img
    assert hires.scale == 2  # A1111's default, unused here (hr_resize_x given)
    off = a1111.to_request(a1111.parse_call({"steps": 4, "enable_hr": False, "hr_scale": 9, "denoising_strength": 0.3}))
    assert off.hires is None  # as A1111: the hr_* keys do nothing without enable_hr


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"steps": 999}, "steps: Input should be less than or equal to 150"),
        ({"cfg_scale": -1}, "cfg_scale: "),
        ({"sampler_name": "Nope"}, "sampler_name: unknown scheduler 'Nope'"),
        ({"batch_size": 4, "n_iter": 3}, "batch_size x n_iter: Input should be less than or equal to 8"),
        ({"batch_size": 0}, "batch_size: must be a whole number of at least 1"),
        ({"steps": 4, "init_images": [INIT], "api": "txt2img"}, "init_images: only for /sdapi/v1/img2img"),
        ({"api": "img2img", "init_images": []}, "init_images: expected a list with exactly one image"),
        ({"api": "img2img", "init_images": [INIT], "denoising_strength": 0}, "denoising_strength: "),
        ({"steps": 4, "restore_faces": True}, "restore_faces: not supported by this worker"),
        ({"steps": 4, "enable_hr": "yes"}, "enable_hr: expected true or false"),
        ({"steps": 4, "enable_hr": True, "hr_scale": 9}, "hr_scale: Input should be less than or equal to 4"),
        ({"steps": 4, "enable_hr": True, "hr_checkpoint_name": "other"}, "hr_checkpoint_name: a second-pass check"),
        ({"steps": 4, "enable_hr": True, "hr_distilled_cfg": 2}, "hr_distilled_cfg: only its default (3.5)"),
        ({"steps": 4, "firstphase_width": 256}, "firstphase_width: the legacy first-phase size is not supported"),
        ({"steps": 4, "enable_hr": True, "hr_sampler_name": "Nope"}, "hr_sampler_name: unknown scheduler 'Nope'"),
        ({"steps": 4, "enable_hr": True, "sampler_name": "Euler a", "hr_scheduler": "Karras"},
         "hr_scheduler: sampler 'Euler a' with schedule 'Karras' is not supported"),
        ({"steps": 4, "seed_resize_from_w": 512}, "seed_resize_from_w: not supported by this worker"),
        ({"steps": 4, "seed_resize_from_h": 768, "seed_resize_from_w": -1}, "seed_resize_from_h: not supported"),
        ({"steps": 4, "subseed_strength": 1.5}, "subseed_strength: Input should be less than or equal to 1"),
        ({"steps": 4, "subseed": -5}, "subseed: Input should be greater than or equal to -1"),
        ({"api": "img2img", "init_images": [INIT], "subseed": 3, "subseed_strength": 0.5},
         "subseed_strength: variation seeds work for txt2img only"),
        ({"steps": 4, "scheduler": "Exponential"}, "scheduler: 'Exponential' needs a sampler_name"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "Polyexponential"},
         "scheduler: sampler 'DPM++ 2M' with schedule 'Polyexponential' is not supported"),
        ({"sampler_name": "Euler a", "scheduler": "Karras"},
         "scheduler: sampler 'Euler a' with schedule 'Karras' is not supported; 'Euler a' takes Uniform"),
        ({"sampler_name": "DDIM", "scheduler": "Wobbly"},
         "scheduler: 'Wobbly' (with sampler 'DDIM') is not a schedule"),
        ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Exponential"},
         "scheduler: 'Exponential' contradicts sampler_name 'DPM++ 2M Karras'"),
        ({"sampler_name": "DPM++ 2S a"}, "sampler_name: 'DPM++ 2S a' is an A1111 sampler with no faithful diffusers"),
        ({"sampler_name": "DPM2 a"}, "sampler_name: 'DPM2 a' is an A1111 sampler with no faithful diffusers"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "Uniform"},
         "scheduler: sampler 'DPM++ 2M' with schedule 'Uniform' is not supported; 'DPM++ 2M' takes Karras"),
        ({"sampler_name": "DPM++ 2S"}, "sampler_name: unknown scheduler 'DPM++ 2S'; valid: Euler, "),
        ({"steps": 4, "num_inference_steps": 4}, "num_inference_steps: unknown field for /sdapi/v1/txt2img (the "
                                                 "input was read as an A1111 txt2img payload because of 'steps')"),
        ({"api": "upscale"}, "api: expected /sdapi/v1/txt2img or /sdapi/v1/img2img"),
        ({"api": {"method": "GET", "endpoint": "/sdapi/v1/txt2img"}}, "api.method: only POST"),
        ({"api": {"endpoint": "/sdapi/v1/txt2img"}, "payload": []}, "payload: expected a JSON object"),
    ],
)


def test_errors_name_a1111_keys(data, expected):
    with pytest.raises(InvalidRequest) as caught:
        a1111.to_request(a1111.parse_call(data))
    assert expected in str(caught.value)


def test_engine_error_messages_get_a1111_names():
    message = "num_inference_steps: too many; num_outputs: 9 x 64x64 exceeds the budget; prompt: bad tag"
    assert a1111.rename_fields(message) == (
        "steps: too many; batch_size x n_iter: 9 x 64x64 exceeds the budget; prompt: bad tag"
    )


# --- listings and extension units (sd_core/a1111_listing.py, a1111_scripts.py) ---------------------------------------


@pytest.mark.parametrize(("data", "endpoint"), [
    ({"api": {"method": "GET", "endpoint": "/sdapi/v1/sd-models"}}, "sd-models"),
    ({"api": {"method": "get", "endpoint": "/sdapi/v1/samplers/"}, "payload": {}}, "samplers"),
    ({"api": {"endpoint": "/sdapi/v1/options"}}, "options"),
    ({"api": "embeddings"}, "embeddings"),
])


def test_listing_calls_are_recognised(data, endpoint):
    assert a1111.parse_call(data).endpoint == endpoint


@pytest.mark.parametrize("scripts", [
    {"ADetailer": {"args": [False]}},
    {"ADetailer": {"args": [False, True, {"ad_model": "face_yolov8n.pt"}]}},
    {"controlnet": {"args": [{"enabled": False, "module": "canny"}, {"enabled": False}]}},
    {"controlnet": {"args": []}, "Regional Prompter": {}, "x": None},
    {},
])


def test_disabled_extension_units_leave_the_request_unchanged(scripts):
    payload = {"prompt": "x", "steps": 3, "seed": 4, "sampler_name": "Euler"}
    with_scripts = a1111.to_request(a1111.parse_call({**payload, "alwayson_scripts": scripts}))
    assert with_scripts == a1111.to_request(a1111.parse_call(payload))


@pytest.mark.parametrize(("scripts", "expected"), [
    ({"ADetailer": {"args": [True, False, {"ad_model": "face_yolov8n.pt"}]}},
     "alwayson_scripts.ADetailer: not supported by this worker"),
    # ControlNet units are translated (tests/adapters/test_runpod_controlnet.py): an incomplete one is refused by key
    ({"ControlNet": {"args": [{"enabled": False}, {"enabled": True, "module": "canny"}]}},
     "alwayson_scripts.ControlNet.args.1.image: expected the control image"),
    ({"controlnet": {"args": [{"module": "canny", "image": "abc"}]}},
     "alwayson_scripts.controlnet.args.0.model: expected a ControlNet model name"),
    ({"controlnet": {"args": [{"module": "openpose_hand", "image": "abc", "model": "m"}]}},
     "alwayson_scripts.controlnet.args.0.module: 'openpose_hand' is not available on this worker (its hand network "
     "needs scikit-image"),
    ({"Seed": {"args": [-1, False]}}, "alwayson_scripts.Seed: not supported by this worker"),
    ({"e" * 500: {"args": [True]}}, "alwayson_scripts.'eeeeee"),
    ({f"ext{i}": {"args": [True]} for i in range(8)}, "alwayson_scripts: 3 more extensions not supported"),
    ("ADetailer", "alwayson_scripts: expected a JSON object"),
])


def test_enabled_extension_units_are_refused_by_name(scripts, expected):
    with pytest.raises(InvalidRequest) as caught:
        a1111.to_request(a1111.parse_call({"steps": 3, "alwayson_scripts": scripts}))
    assert expected in str(caught.value) and len(str(caught.value)) < 1000


def test_a_listing_call_translates_to_no_generation():
    with pytest.raises(InvalidRequest, match=r"^api.endpoint: /sdapi/v1/sd-models lists, it generates nothing$"):
        a1111.to_request(a1111.parse_call({"api": "sd-models"}))


def test_a_hashed_checkpoint_title_names_its_model_when_sent_back():
    from types import SimpleNamespace

    from sd_core import a1111_listing
    from sd_core.manifests import ModelCatalog, ModelManifest

    digest = "0123456789abcdef" * 4
    manifest = ModelManifest(name="my-model", architecture="sd15", format="single_file", sha256=digest,
                             uri="https://user:secret@host/my.safetensors?X-Amz-Signature=abc", config_uri="cfg/")
    engine = SimpleNamespace(catalog=ModelCatalog({"my-model": manifest}), settings=SimpleNamespace(
        default_model="my-model"))
    [item] = a1111_listing.answer("sd-models", {}, engine)
    assert (item["title"], item["hash"], item["sha256"]) == ("my-model [0123456789]", "0123456789", digest)
    assert "secret" not in item["filename"] and "Signature" not in item["filename"]
    assert a1111_listing.answer("options", {}, engine)["sd_model_checkpoint"] == item["title"]
    call = a1111.parse_call({"steps": 2, "override_settings": {"sd_model_checkpoint": item["title"]}})
    assert a1111.to_request(call).model == "my-model"


@pytest.mark.parametrize(("extra", "refused"), [
    ({"s_churn": 0, "s_tmin": 0.0, "s_tmax": None, "s_noise": 1, "s_min_uncond": 0, "infotext": ""}, None),
    ({"s_tmax": float("inf")}, None),
    ({"s_churn": 0.5}, "s_churn: only A1111's default (0)"),
    ({"s_noise": 0.9}, "s_noise: only A1111's default (1)"),
    ({"s_min_uncond": 1.5}, "s_min_uncond: only A1111's default (0)"),
    ({"infotext": "a fox\nSteps: 20"}, "infotext: only A1111's default ('')"),
])


def test_image_changing_sampler_knobs_are_honoured_at_their_defaults_or_refused(extra, refused):
    call = a1111.parse_call({"prompt": "x", "steps": 2, **extra})
    if refused is None:
        assert a1111.to_request(call) == a1111.to_request(a1111.parse_call({"prompt": "x", "steps": 2}))
        return
    with pytest.raises(InvalidRequest) as caught:
        a1111.to_request(call)
    assert refused in str(caught.value)


def _img2img(**extra):
    return a1111.to_request(a1111.parse_call({"api": "img2img", "init_images": [INIT], **extra}))


def test_inpainting_keys_take_a1111s_defaults():
    request = _img2img(mask=INIT)
    assert (request.mask_blur, request.mask_blur_y, request.invert_mask) == (4, None, False)
    assert (request.inpaint_fill, request.padding_mask_crop, request.inpaint_overlay) == ("fill", 0, True)
    assert request.resize_mode == "resize"


@pytest.mark.parametrize(("extra", "fields"), [
    ({"mask_blur": 0}, {"mask_blur": 0, "mask_blur_y": None}),
    ({"mask_blur_x": 2, "mask_blur_y": 6}, {"mask_blur": 2, "mask_blur_y": 6}),
    ({"mask_blur_x": 2, "mask_blur_y": 6, "mask_blur": 3}, {"mask_blur": 3, "mask_blur_y": None}),
    ({"inpainting_mask_invert": 1}, {"invert_mask": True}),
    ({"inpainting_fill": 1}, {"inpaint_fill": "original"}),
    ({"inpainting_fill": 2}, {"inpaint_fill": "latent_noise"}),
    ({"inpainting_fill": 3}, {"inpaint_fill": "latent_nothing"}),
    ({"inpaint_full_res": False, "inpaint_full_res_padding": 32}, {"padding_mask_crop": None}),
    ({"inpaint_full_res": True, "inpaint_full_res_padding": 32}, {"padding_mask_crop": 32}),
    ({"resize_mode": 1}, {"resize_mode": "crop"}),
    ({"resize_mode": 2}, {"resize_mode": "fill"}),
])


def test_inpainting_keys_are_translated(extra, fields):
    request = _img2img(mask=INIT, **extra)
    assert {name: getattr(request, name) for name in fields} == fields


def test_resize_mode_3_is_the_latent_resize():  # no mask: A1111's "just resize (latent upscale)"
    assert _img2img(resize_mode=3).resize_mode == "latent"


def test_mask_keys_without_a_mask_change_nothing_as_in_a1111():
    assert _img2img(mask_blur=9, inpainting_fill=2, inpainting_mask_invert=1) == _img2img()


@pytest.mark.parametrize(("extra", "refused"), [
    ({"mask": INIT, "resize_mode": 3}, "resize_mode: latent is for img2img without a mask"),
    ({"resize_mode": 7}, "resize_mode: must be a whole number from 0 to 3"),
    ({"mask": INIT, "inpainting_fill": 4}, "inpainting_fill: must be a whole number from 0 to 3"),
    ({"mask": INIT, "mask_blur": 65}, "mask_blur: must be a whole number from 0 to 64"),
    ({"mask": INIT, "inpainting_mask_invert": 2}, "inpainting_mask_invert: must be a whole number from 0 to 1"),
    ({"mask": INIT, "inpaint_full_res_padding": -1}, "inpaint_full_res_padding: must be a whole number"),
    ({"mask": INIT, "mask_round": False}, "mask_round: only true"),
])


def test_bad_inpainting_keys_are_refused(extra, refused):
    with pytest.raises(InvalidRequest) as caught:
        _img2img(**extra)
    assert refused in str(caught.value)


def test_refiner_checkpoint_translation():
    request = a1111.to_request(a1111.parse_call({"steps": 4, "refiner_checkpoint": "my-refiner.safetensors [0123abcd]",
                                                 "refiner_switch_at": 0.75}))
    assert (request.refine, request.refiner, request.high_noise_frac) == ("expert_ensemble_refiner", "my-refiner", 0.75)
    for off in ("", "None", "none", None):  # A1111's "no refiner"; a switch alone changes nothing
        request = a1111.to_request(a1111.parse_call({"steps": 4, "refiner_checkpoint": off, "refiner_switch_at": 0.5}))
        assert (request.refine, request.refiner) == ("no_refiner", None)
    for payload, message in (
        ({"refiner_checkpoint": "r"}, "refiner_switch_at: required with refiner_checkpoint"),
        ({"refiner_checkpoint": "r", "refiner_switch_at": 0}, "refiner_switch_at: 0 (the refiner from the first step)"),
        ({"refiner_checkpoint": "r", "refiner_switch_at": 1.5}, "refiner_switch_at: Input should be less than"),
        ({"refiner_checkpoint": ".safetensors", "refiner_switch_at": 0.5}, "refiner_checkpoint: expected a checkpoint"),
        ({"refiner_checkpoint": "r", "refiner_switch_at": 0.5, "init_images": [INIT]},
         "refine: the refiner pass works for txt2img only"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            a1111.to_request(a1111.parse_call({"steps": 4, **payload}))
        assert a1111.rename_fields(str(caught.value)).startswith(message.replace("refine:", "refiner_checkpoint:")), \
            str(caught.value)
