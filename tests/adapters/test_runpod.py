"""The RunPod worker on the SDK's local API server (/runsync, /run + /status), tiny model fetched from local S3.

One server for the module: inline base64 outputs with a low result limit (SD_MAX_RESPONSE_MB=0.3, so that an
over-limit result is cheap to make), and progress updates sent to a local receiver.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time

import pytest
from PIL import Image

from sd_core.outputs import read_parameters
from tests.fixtures import a1111_infotext as a1111
from tests.fixtures.runpod_server import start_runpod_server

FAST = {"prompt": "a red fox in the snow", "num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(runpod_weights_env, progress_receiver, tmp_path_factory):
    env = {**runpod_weights_env, **progress_receiver.env, "SD_MAX_RESPONSE_MB": "0.3",
           "SD_PROGRESS_INTERVAL_S": "60", "SD_CONCURRENCY": "2"}
    with start_runpod_server(env, log_dir=tmp_path_factory.mktemp("runpod")) as server:
        yield server


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def completed(job: dict) -> dict:
    assert job["status"] == "COMPLETED", job.get("error", job)
    return job["output"]


# --- lifecycle -----------------------------------------------------------------------------------------------------


def test_cold_start_fetched_the_model_from_s3_and_logged_progress(server, runpod_weights_env):
    log = server.log_text()
    assert "cold start: preloading tiny-sd15" in log
    assert f"{runpod_weights_env['SD_WEIGHTS_URI']}/tiny-sd15/" in log  # fetched from the local S3 server
    assert "ready in" in log and "outputs: inline base64" in log


# --- native requests -----------------------------------------------------------------------------------------------


def test_runsync_returns_images_of_the_requested_size_count_and_seed(server):
    started = time.perf_counter()
    output = completed(server.runsync({**FAST, "width": 64, "height": 80, "num_outputs": 2, "seed": 1234}))
    latency = time.perf_counter() - started
    assert [entry["seed"] for entry in output["images"]] == [1234, 1235] == output["seeds"]
    assert output["seed"] == 1234 and output["model"] == "tiny-sd15"
    for entry in output["images"]:
        image = decode(entry["image"])
        assert image.format == "PNG" and image.size == (64, 80) == (entry["width"], entry["height"])
        assert entry["mime_type"] == "image/png"
    assert "Steps: 2, Sampler: Euler a" in output["parameters"] and "Seed: 1234" in output["parameters"]
    assert output["timings"]["total_s"] > 0
    print(f"/runsync, tiny model, 2 images 64x80, 2 steps: {latency:.3f}s")


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP")])


def test_output_formats(server, fmt, pil):
    output = completed(server.runsync({**FAST, "output_format": fmt, "seed": 3}))
    entry = output["images"][0]
    assert entry["mime_type"] == f"image/{fmt}" and decode(entry["image"]).format == pil
    assert "Seed: 3" in read_parameters(base64.b64decode(entry["image"]))


def test_run_then_status(server):
    job_id = server.run({**FAST, "seed": 99})
    job = server.status(job_id)
    assert job["id"] == job_id
    output = completed(job)
    assert output["seed"] == 99 and decode(output["images"][0]["image"]).size == (64, 64)


def test_random_seed_is_reported_and_reproduces_the_image(server):
    first = completed(server.runsync(FAST))
    again = completed(server.runsync({**FAST, "seed": first["seed"]}))
    assert decode(again["images"][0]["image"]).tobytes() == decode(first["images"][0]["image"]).tobytes()


def test_img2img_keeps_the_init_image_size(server):
    init = png_b64(Image.new("RGB", (72, 64), (200, 40, 40)))
    output = completed(server.runsync({**FAST, "image": init, "strength": 0.5, "num_inference_steps": 4,
                                       "width": None, "height": None}))
    assert decode(output["images"][0]["image"]).size == (72, 64)


def test_progress_updates_carry_step_counts_and_are_throttled(server, progress_receiver):
    job = server.runsync({**FAST, "num_inference_steps": 6, "seed": 5})
    completed(job)
    updates = progress_receiver.updates(job["id"], at_least=2)
    # SD_PROGRESS_INTERVAL_S=60: the first step, then only the last one (not one update per step).
    assert sorted((u["step"], u["steps"]) for u in updates) == [(1, 6), (6, 6)]
    assert {u["percent"] for u in updates} == {16, 100}


def test_the_event_loop_stays_free_while_a_job_runs(server, progress_receiver):
    """The handler is async: a second job is answered while a long one is still denoising."""
    job_id = server.run({**FAST, "num_inference_steps": 30, "width": 128, "height": 128})
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(job=server.status(job_id)))  # runs the job
    thread.start()
    try:
        assert progress_receiver.updates(job_id, at_least=1, timeout=120), "the slow job never started denoising"
        bad = server.runsync({**FAST, "num_inference_steps": 0}, timeout=30)
        assert bad["status"] == "FAILED"
        assert thread.is_alive(), "the second job was answered only after the first"
    finally:
        thread.join(timeout=300)
    completed(slow["job"])


# --- A1111 payloads ------------------------------------------------------------------------------------------------


def test_a1111_txt2img_answers_in_a1111_shape_with_the_native_image(server):
    payload = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 2, "cfg_scale": 5, "width": 64,
               "height": 72, "sampler_name": "Euler a", "batch_size": 2, "n_iter": 1, "seed": 77,
               "send_images": True, "save_images": False}
    output = completed(server.runsync(payload))
    assert set(output) == {"images", "parameters", "info"}
    assert len(output["images"]) == 2 and all(decode(b64).size == (64, 72) for b64 in output["images"])
    params = output["parameters"]
    assert (params["steps"], params["cfg_scale"], params["sampler_name"], params["seed"]) == (2, 5, "Euler a", 77)
    info = json.loads(output["info"])
    assert info["all_seeds"] == [77, 78] and info["seed"] == 77 and info["sd_model_name"] == "tiny-sd15"
    assert len(info["infotexts"]) == 2 and "Seed: 78" in info["infotexts"][1]
    # The same generation asked natively gives the same pixels: the translation lost nothing.
    native = completed(server.runsync({"prompt": "a lighthouse", "negative_prompt": "fog", "num_inference_steps": 2,
                                       "guidance_scale": 5, "width": 64, "height": 72, "scheduler": "Euler a",
                                       "num_outputs": 2, "seed": 77}))
    assert decode(native["images"][1]["image"]).tobytes() == decode(output["images"][1]).tobytes()


def test_a1111_img2img_in_runpods_api_wrapper(server):
    init = png_b64(Image.new("RGB", (72, 64), (20, 90, 200)))
    job = {"api": {"method": "POST", "endpoint": "/sdapi/v1/img2img"},
           "payload": {"prompt": "a boat", "init_images": [init], "denoising_strength": 0.5, "steps": 4,
                       "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 11, "mask_blur": 4}}
    output = completed(server.runsync(job))
    assert decode(output["images"][0]).size == (72, 64)
    params = output["parameters"]
    assert params["init_images"] is None and params["denoising_strength"] == 0.5
    assert params["sampler_name"] == "DPM++ 2M Karras"
    info = json.loads(output["info"])
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]


def test_a1111_inpaint_does_what_a1111_does_and_equals_the_native_fields(server):
    init = Image.effect_noise((80, 64), 60).convert("RGB")
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (32, 16, 56, 40))
    common = {"prompt": "a boat", "seed": 5, "denoising_strength": 0.9, "steps": 3, "sampler_name": "Euler"}
    payload = {**common, "init_images": [png_b64(init)], "mask": png_b64(mask), "inpainting_mask_invert": 1,
               "mask_blur_x": 2, "mask_blur_y": 6, "inpaint_full_res_padding": 8, "width": 64, "height": 64}
    output = completed(server.runsync({"api": "img2img", **payload}))
    image = decode(output["images"][0])
    assert image.size == (80, 64)  # only masked (A1111's default): the image keeps its size
    native = completed(server.runsync({
        "prompt": "a boat", "seed": 5, "strength": 0.9, "num_inference_steps": 3, "scheduler": "Euler",
        "image": png_b64(init), "mask": png_b64(mask), "invert_mask": True, "mask_blur": 2, "mask_blur_y": 6,
        "inpaint_fill": "fill", "padding_mask_crop": 8, "inpaint_overlay": True, "width": 64, "height": 64}))
    assert decode(native["images"][0]["image"]).tobytes() == image.tobytes()
    whole = completed(server.runsync({"api": "img2img", **payload, "inpaint_full_res": False, "width": 80}))
    assert decode(whole["images"][0]).tobytes() != image.tobytes()
    refused = server.runsync({"api": "img2img", **payload, "resize_mode": 3})  # latent upscale: not with a mask
    assert refused["status"] == "FAILED" and "resize_mode: latent is for img2img without a mask" in refused["error"]


def test_a1111_infotext_round_trips_in_png_info_and_info(server, tiny_bucket):
    payload = {"prompt": "a fox, at night <lora:tiny-style:0.6>", "negative_prompt": "fog", "steps": 3,
               "cfg_scale": 6, "width": 64, "height": 64, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
               "seed": 31}
    output = completed(server.runsync(payload))
    info = json.loads(output["info"])
    lora_hash = hashlib.sha256((tiny_bucket / "loras" / "tiny-sd15-peft.safetensors").read_bytes()).hexdigest()[:12]
    for text in (read_parameters(base64.b64decode(output["images"][0])), info["infotexts"][0]):
        got = a1111.parse(text)
        assert got["Prompt"] == payload["prompt"] and got["Negative prompt"] == "fog"
        assert (got["Steps"], got["CFG scale"], got["Seed"], got["Size-1"], got["Size-2"]) == ("3", "6", "31", "64",
                                                                                              "64")
        assert (got["Sampler"], got["Schedule type"], got["Model"]) == ("DPM++ 2M", "Karras", "tiny-sd15")
        assert a1111.loras(got["Prompt"]) == {"tiny-style": (0.6, 0.6)}
        assert a1111.lora_hashes(got) == {"tiny-style": lora_hash}
        assert "Model hash" not in got  # a diffusers folder: no single checkpoint file to hash, as A1111
    assert (info["prompt"], info["sampler_name"], info["clip_skip"], info["sd_model_hash"]) == (
        payload["prompt"], "DPM++ 2M", 1, None)
    assert info["extra_generation_params"] == {"Schedule type": "Karras", "Lora hashes": f"tiny-style: {lora_hash}"}


def test_a1111_negative_embedding_by_name(server, tiny_bucket):
    payload = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 9, "sampler_name": "Euler"}
    negated = completed(server.runsync({**payload, "negative_prompt": "fog, (tiny-neg:1.2)"}))
    plain = completed(server.runsync({**payload, "negative_prompt": "fog, tiny-negative"}))  # another word
    before = completed(server.runsync({**payload, "negative_prompt": "fog, tiny-negative"}))
    assert decode(negated["images"][0]).tobytes() != decode(plain["images"][0]).tobytes()
    assert decode(before["images"][0]).tobytes() == decode(plain["images"][0]).tobytes()
    digest = hashlib.sha256((tiny_bucket / "embeddings" / "tiny-sd15-neg.safetensors").read_bytes()).hexdigest()
    info = json.loads(negated["info"])
    assert info["negative_prompt"] == "fog, (tiny-neg:1.2)"
    assert info["extra_generation_params"]["TI hashes"] == f"tiny-neg: {digest[:12]}"
    for text in (read_parameters(base64.b64decode(negated["images"][0])), info["infotexts"][0]):
        assert a1111.parse(text)["TI hashes"] == f"tiny-neg: {digest[:12]}"
    assert "TI hashes" not in json.loads(plain["info"])["extra_generation_params"]


def test_a1111_clip_skip_from_override_settings(server):
    payload = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 9, "sampler_name": "Euler"}
    skipped = completed(server.runsync({**payload, "override_settings": {"CLIP_stop_at_last_layers": 2}}))
    plain = completed(server.runsync({**payload, "override_settings": {"CLIP_stop_at_last_layers": 1}}))
    native = completed(server.runsync({"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64,
                                       "seed": 9, "scheduler": "Euler", "clip_skip": 1}))
    assert decode(skipped["images"][0]).tobytes() == decode(native["images"][0]["image"]).tobytes()
    assert decode(skipped["images"][0]).tobytes() != decode(plain["images"][0]).tobytes()
    info = json.loads(skipped["info"])
    assert info["clip_skip"] == 2 and json.loads(plain["info"])["clip_skip"] == 1
    for text in (read_parameters(base64.b64decode(skipped["images"][0])), info["infotexts"][0]):
        assert a1111.parse(text)["Clip skip"] == "2"
    assert "Clip skip" not in json.loads(plain["info"])["infotexts"][0]
    sdxl = server.runsync({**payload, "override_settings": {"sd_model_checkpoint": "tiny-sdxl",
                                                             "CLIP_stop_at_last_layers": 2}}, timeout=120)
    assert sdxl["status"] == "FAILED"
    assert sdxl["error"].startswith("override_settings.CLIP_stop_at_last_layers: 'tiny-sdxl' is a sdxl model, "
                                    "which takes no clip skip")


def test_a1111_sd_vae_from_override_settings(server, tiny_bucket):
    payload = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 9, "sampler_name": "Euler"}
    swapped = completed(server.runsync({**payload, "override_settings": {"sd_vae": "tiny-vae.safetensors"}}))
    automatic = completed(server.runsync({**payload, "override_settings": {"sd_vae": "Automatic"}}))
    plain = completed(server.runsync(payload))
    native = completed(server.runsync({"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64,
                                       "seed": 9, "scheduler": "Euler", "vae": "tiny-vae"}))
    assert decode(swapped["images"][0]).tobytes() == decode(native["images"][0]["image"]).tobytes()
    assert decode(swapped["images"][0]).tobytes() != decode(plain["images"][0]).tobytes()
    assert decode(automatic["images"][0]).tobytes() == decode(plain["images"][0]).tobytes()
    digest = hashlib.sha256((tiny_bucket / "vaes" / "tiny-sd15-vae.safetensors").read_bytes()).hexdigest()[:10]
    info = json.loads(swapped["info"])
    assert (info["sd_vae_name"], info["sd_vae_hash"]) == ("tiny-vae", digest)
    assert (json.loads(plain["info"])["sd_vae_name"], json.loads(plain["info"])["sd_vae_hash"]) == (None, None)
    for text in (read_parameters(base64.b64decode(swapped["images"][0])), info["infotexts"][0]):
        got = a1111.parse(text)
        assert (got["VAE"], got["VAE hash"]) == ("tiny-vae", digest)
    unknown = server.runsync({**payload, "override_settings": {"sd_vae": "tiny-xl-vae"}}, timeout=60)
    assert unknown["status"] == "FAILED"
    assert unknown["error"].startswith("override_settings.sd_vae: unknown VAE 'tiny-xl-vae' for tiny-sd15; "
                                       "available: tiny-vae, tiny-vae-folder"), unknown["error"]


def test_a1111_refiner_checkpoint_runs_the_expert_ensemble(server):
    payload = {"prompt": "a lighthouse", "steps": 2, "cfg_scale": 5, "width": 64, "height": 64, "sampler_name": "Euler",
               "seed": 12, "override_settings": {"sd_model_checkpoint": "tiny-sdxl"},
               "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5}
    refined = completed(server.runsync(payload, timeout=240))
    native = completed(server.runsync({"prompt": "a lighthouse", "num_inference_steps": 2, "guidance_scale": 5,
                                       "width": 64, "height": 64, "scheduler": "Euler", "seed": 12,
                                       "model": "tiny-sdxl", "refine": "expert_ensemble_refiner",
                                       "high_noise_frac": 0.5}, timeout=240))
    assert decode(refined["images"][0]).tobytes() == decode(native["images"][0]["image"]).tobytes()
    info = json.loads(refined["info"])
    assert info["extra_generation_params"]["Refiner"] == "tiny-sdxl-refiner"
    assert info["extra_generation_params"]["Refiner switch at"] == 0.5
    got = a1111.parse(read_parameters(base64.b64decode(refined["images"][0])))
    assert (got["Refiner"], got["Refiner switch at"]) == ("tiny-sdxl-refiner", "0.5")
    sd15 = server.runsync({**payload, "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}, timeout=120)
    assert sd15["status"] == "FAILED"
    assert sd15["error"].startswith("refiner_checkpoint: 'tiny-sdxl-refiner' refines sdxl models, not 'tiny-sd15'")
    no_switch = server.runsync({k: v for k, v in payload.items() if k != "refiner_switch_at"}, timeout=120)
    assert no_switch["status"] == "FAILED" and no_switch["error"].startswith("refiner_switch_at: required")


def test_a1111_txt2img_on_an_sd3_model_runs_euler_and_equals_the_native_request(server):
    payload = {"prompt": "a lighthouse", "steps": 2, "cfg_scale": 5, "width": 64, "height": 64, "seed": 5,
               "sampler_name": "Euler", "scheduler": "Automatic",
               "override_settings": {"sd_model_checkpoint": "tiny-sd3"}}
    output = completed(server.runsync(payload))
    assert json.loads(output["info"])["sd_model_name"] == "tiny-sd3"
    native = completed(server.runsync({"model": "tiny-sd3", "prompt": "a lighthouse", "num_inference_steps": 2,
                                       "guidance_scale": 5, "width": 64, "height": 64, "seed": 5}))
    assert decode(output["images"][0]).tobytes() == decode(native["images"][0]["image"]).tobytes()
    refused = server.runsync({**payload, "sampler_name": "DPM++ 2M"})
    assert refused["status"] == "FAILED" and refused["error"] == (
        "scheduler: 'DPM++ 2M Karras' does not run tiny-sd3's model family (sd3); valid: Euler")


def test_a1111_prompt_syntax_reaches_the_encoder(server):
    prompt = "a (fox:1.0) in the [snow:forest:1] BREAK night"
    payload = {"prompt": prompt, "negative_prompt": "(blurry:1.3)", "steps": 4, "width": 64, "height": 64,
               "seed": 9, "sampler_name": "Euler"}
    output = completed(server.runsync(payload))
    native = completed(server.runsync({"prompt": prompt, "negative_prompt": "(blurry:1.3)", "num_inference_steps": 4,
                                       "width": 64, "height": 64, "seed": 9, "scheduler": "Euler"}))
    literal = completed(server.runsync({**payload, "negative_prompt": "blurry"}))
    assert decode(output["images"][0]).tobytes() == decode(native["images"][0]["image"]).tobytes()
    assert decode(output["images"][0]).tobytes() != decode(literal["images"][0]).tobytes()
    info = json.loads(output["info"])
    assert info["prompt"] == prompt and a1111.parse(info["infotexts"][0])["Prompt"] == prompt
    bad = server.runsync({**payload, "prompt": "a (fox:1.2.3)"})
    assert bad["status"] == "FAILED" and bad["error"] == "prompt: attention weight '1.2.3' is not a number"


def test_a1111_variation_seeds_reach_the_image_info_and_infotext(server):
    payload = {"prompt": "a lighthouse", "steps": 2, "cfg_scale": 5, "width": 64, "height": 64, "sampler_name": "Euler",
               "seed": 40, "subseed": 50, "subseed_strength": 1, "batch_size": 2, "seed_resize_from_w": -1}
    output = completed(server.runsync(payload))
    info = json.loads(output["info"])
    assert (info["all_seeds"], info["subseed"], info["all_subseeds"], info["subseed_strength"]) == (
        [40, 41], 50, [50, 51], 1)
    got = a1111.parse(info["infotexts"][1])
    assert (got["Seed"], got["Variation seed"], got["Variation seed strength"]) == ("41", "51", "1")
    # Strength 1 is the subseed's image: the same as a native run with seed = subseed (same batch), pixel for pixel.
    native = completed(server.runsync({"prompt": "a lighthouse", "num_inference_steps": 2, "guidance_scale": 5,
                                       "width": 64, "height": 64, "scheduler": "Euler", "seed": 50, "num_outputs": 2}))
    for index in range(2):
        assert decode(native["images"][index]["image"]).tobytes() == decode(output["images"][index]).tobytes()
    half = completed(server.runsync({**payload, "subseed_strength": 0.5, "batch_size": 1}))
    assert decode(half["images"][0]).tobytes() != decode(output["images"][0]).tobytes()
    assert "Variation seed strength: 0.5" in json.loads(half["info"])["infotexts"][0]


def test_a1111_eta_and_schedule_type_reach_the_sampler(server):
    payload = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "seed": 5, "sampler_name": "DDIM"}
    noisy = completed(server.runsync({**payload, "eta": 0.6}))
    plain = completed(server.runsync(payload))
    assert decode(noisy["images"][0]).tobytes() != decode(plain["images"][0]).tobytes()
    native = {"prompt": "a lighthouse", "num_inference_steps": 3, "width": 64, "height": 64, "seed": 5}
    same = completed(server.runsync({**native, "scheduler": "DDIM", "eta": 0.6}))
    assert decode(same["images"][0]["image"]).tobytes() == decode(noisy["images"][0]).tobytes()
    sgm = completed(server.runsync({**payload, "sampler_name": "Euler", "scheduler": "SGM Uniform"}))
    assert json.loads(sgm["info"])["extra_generation_params"]["Schedule type"] == "SGM Uniform"
    same = completed(server.runsync({**native, "scheduler": "Euler SGM Uniform"}))
    assert decode(same["images"][0]["image"]).tobytes() == decode(sgm["images"][0]).tobytes()


def test_a1111_hires_fix_upscales_and_equals_the_native_hires(server):
    payload = {"prompt": "a lighthouse", "steps": 2, "cfg_scale": 5, "width": 64, "height": 64, "seed": 8,
               "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent (nearest)",
               "hr_second_pass_steps": 2, "denoising_strength": 0.5, "hr_sampler_name": "Use same sampler",
               "hr_checkpoint_name": "Use same checkpoint", "hr_prompt": "", "firstphase_width": 0}
    output = completed(server.runsync(payload))
    image = decode(output["images"][0])
    assert image.size == (128, 128)
    info = json.loads(output["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (64, 64, 0.5)  # A1111: the first pass's
    assert info["extra_generation_params"]["Hires upscaler"] == "Latent (nearest)"
    got = a1111.parse(info["infotexts"][0])
    assert (got["Size-1"], got["Hires upscale"], got["Hires steps"], got["Denoising strength"]) == ("64", "2", "2",
                                                                                                    "0.5")
    native = completed(server.runsync({"prompt": "a lighthouse", "num_inference_steps": 2, "guidance_scale": 5,
                                       "width": 64, "height": 64, "scheduler": "Euler", "seed": 8,
                                       "hires": {"upscaler": "Latent (nearest)", "steps": 2,
                                                 "denoising_strength": 0.5}}))
    assert decode(native["images"][0]["image"]).tobytes() == image.tobytes()
    refused = server.runsync({**payload, "hr_upscaler": "4x-Nope"})
    assert refused["status"] == "FAILED"
    assert "hr_upscaler: unknown upscaler '4x-Nope'; valid: Latent" in refused["error"]


def test_a1111_send_images_false_returns_no_images(server):
    output = completed(server.runsync({"api": "txt2img", "prompt": "x", "steps": 2, "send_images": False}))
    assert output["images"] == [] and json.loads(output["info"])["all_seeds"]


# --- bad inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_input", "expected"),
    [
        ({**FAST, "num_inference_steps": 999}, "num_inference_steps: Input should be less than or equal to 150"),
        ({**FAST, "width": 30}, "width: "),
        ({**FAST, "width": 100}, "width: must be a multiple of 8 (got 100)"),
        ({**FAST, "scheduler": "Nope"}, "scheduler: unknown scheduler 'Nope'"),
        ({**FAST, "bogus": 1}, "bogus: unknown field"),
        ({**FAST, "model": "missing"}, "model: unknown model 'missing'"),
        ({**FAST, "image": "not base64!"}, "image: not valid base64"),
        ({**FAST, "loras": [{"source": "no-such-lora"}]}, "no-such-lora"),
        ({"prompt": "x", "steps": 999}, "steps: Input should be less than or equal to 150"),
        ({"prompt": "x", "steps": 2, "sampler_name": "Nope"}, "sampler_name: unknown scheduler 'Nope'"),
        ({"prompt": "x", "steps": 2, "batch_size": 9}, "batch_size x n_iter: Input should be less than or equal to 8"),
        ({"api": "img2img", "steps": 2, "init_images": ["@@@"]}, "init_images: not valid base64"),
        ({"prompt": "x", "steps": 2, "sampler_name": "Euler a", "eta": 0.5},
         "eta: sampler 'Euler a' runs only with eta 1 here"),
        ({"prompt": "x", "steps": 2, "sampler_name": "DPM++ 2M", "scheduler": "Simple"},
         "scheduler: sampler 'DPM++ 2M' with schedule 'Simple' is not supported"),
        ({**FAST, "scheduler": "Euler a Karras"},
         "scheduler: sampler 'Euler a' with schedule 'Karras' is not supported"),
    ],
)


def test_bad_input_fails_with_the_field_named(server, job_input, expected):
    job = server.runsync(job_input, timeout=60)
    assert job["status"] == "FAILED", job
    assert expected in job["error"]
    assert "Traceback" not in job["error"]


def test_the_worker_serves_normally_right_after_a_bad_input(server):
    assert server.runsync({**FAST, "num_outputs": 99})["status"] == "FAILED"
    assert server.runsync({"api": {"endpoint": "/sdapi/v1/upscale"}})["status"] == "FAILED"
    completed(server.runsync({**FAST, "seed": 1}))
    job_id = server.run({**FAST, "steps": 3})
    assert server.status(job_id)["status"] == "FAILED"
    completed(server.runsync(FAST))


def test_an_over_limit_base64_result_fails_clearly(server):
    job = server.runsync({**FAST, "num_outputs": 4, "width": 256, "height": 256})
    assert job["status"] == "FAILED", "4 noisy 256x256 PNGs should exceed SD_MAX_RESPONSE_MB=0.3"
    assert "over this worker's limit of 0.3 MB (SD_MAX_RESPONSE_MB" in job["error"]
    assert "Configure an output bucket (BUCKET_ENDPOINT_URL" in job["error"]


# --- LoRAs ---------------------------------------------------------------------------------------------------------


def test_loras_reach_the_engine_from_native_and_a1111_payloads(server):
    base = {**FAST, "prompt": "a fox", "seed": 21}

    def pixels(output: dict) -> bytes:
        entry = output["images"][0]
        return decode(entry if isinstance(entry, str) else entry["image"]).tobytes()

    plain = pixels(completed(server.runsync(base)))
    listed = completed(server.runsync({**base, "loras": [{"source": "tiny-style", "scale": 1.0}]}))
    assert pixels(listed) != plain
    assert listed["parameters"].startswith("a fox <lora:tiny-style:1>\n")  # the field's LoRA as an A1111 tag
    assert "Lora hashes: \"tiny-style: " in listed["parameters"]
    tagged = pixels(completed(server.runsync({**base, "prompt": "a fox <lora:tiny-style:1>"})))
    assert tagged == pixels(listed)
    a1111 = completed(server.runsync({"prompt": "a fox <lora:tiny-style:1>", "steps": 2, "width": 64, "height": 64,
                                      "seed": 21}))
    assert pixels(a1111) == pixels(listed)
    # Back to no LoRA: the base output again.
    assert pixels(completed(server.runsync(base))) == plain


# --- safety checker: off by default on RunPod (tests/sd_core/test_safety.py turns it on)


def test_safety_checker_is_off_by_default_and_images_report_nsfw_false(server):
    assert "safety checker" not in server.log_text()  # nothing fetched or loaded
    output = completed(server.runsync({**FAST, "num_outputs": 2, "seed": 5}))
    assert [entry["nsfw"] for entry in output["images"]] == [False, False]
    a1111 = completed(server.runsync({"prompt": "a fox", "steps": 2, "seed": 5}))
    assert json.loads(a1111["info"])["nsfw"] == [False]


# --- IP-Adapter image prompts (more in tests/sd_core/test_ip_adapter.py) ----------------------------------------------
def test_ip_adapters_reach_the_engine_from_native_and_a1111_payloads(server, engine):
    from sd_core.schema import GenerationRequest

    reference = png_b64(Image.new("RGB", (48, 48), (20, 180, 240)))
    base = {**FAST, "prompt": "a fox", "seed": 23}

    def pixels(output: dict) -> bytes:
        entry = output["images"][0]
        return decode(entry if isinstance(entry, str) else entry["image"]).tobytes()

    plain = pixels(completed(server.runsync(base)))
    entry = {"model": "tiny-ip-adapter", "image": reference, "scale": 0.7}
    native = pixels(completed(server.runsync({**base, "ip_adapters": [entry]})))
    assert native != plain
    in_process = engine.generate(GenerationRequest(**base, ip_adapters=[entry]))
    assert native == Image.open(io.BytesIO(in_process.images[0].data)).tobytes()
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "tiny-ip-adapter [0123abcd]", "weight": 0.7,
            "image": reference}
    a1111_payload = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 23,
                     "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    assert pixels(completed(server.runsync(a1111_payload))) == native
    face_unit = {**unit, "module": "ip-adapter_face_id"}
    face_id = {**a1111_payload, "alwayson_scripts": {"controlnet": {"args": [face_unit]}}}
    job = server.runsync(face_id)
    assert job["status"] == "FAILED" and "insightface" in job["error"]
    assert pixels(completed(server.runsync(base))) == plain  # unloaded: the plain image again


def test_flux_native_and_a1111_payloads(server):
    """FLUX through the local API: native with max_sequence_length, A1111 (Euler, cfg_scale = FLUX guidance) giving
    the same image at the same settings; a negative prompt is refused, naming the field."""
    native = completed(server.runsync({"model": "tiny-flux", "prompt": "a red fox", "seed": 5, "guidance_scale": 3.5,
                                       "max_sequence_length": 32}))
    a1111_output = completed(server.runsync({"prompt": "a red fox", "seed": 5, "sampler_name": "Euler",
                                             "scheduler": "Automatic", "cfg_scale": 3.5, "steps": 4, "width": 64,
                                             "height": 64,
                                             "override_settings": {"sd_model_checkpoint": "tiny-flux"}}))
    assert decode(native["images"][0]["image"]).tobytes() == decode(a1111_output["images"][0]).tobytes()
    refused = server.runsync({"model": "tiny-flux", "prompt": "a red fox", "negative_prompt": "blur"})
    assert refused["status"] == "FAILED" and "negative_prompt: 'tiny-flux' is a flux model" in str(refused)
