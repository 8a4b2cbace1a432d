"""FLUX.1 Fill (inpaint / outpaint only, equal to bare FluxFillPipeline) and FLUX single files (a transformer file on
the base model's folder, by manifest and by URL) on the tiny twins of devtools/tiny_flux.py and tiny_flux_fill.py."""

import io

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from sd_core.a1111 import A1111Call, to_request
from sd_core.errors import InvalidRequest, ManifestError
from sd_core.families import FAMILIES, detect_architecture
from sd_core.model_urls import url_label
from sd_core.schema import GenerationRequest
from tests.fixtures.http_files import FileHandler, serving
from tests.fixtures.images import box_mask, noise_image
from tests.fixtures.images import png_b64 as png

PROMPT = "a red cat in the snow"
CALL = dict(prompt=PROMPT, num_inference_steps=4, max_sequence_length=32, height=64, width=64)


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"))


def generate(engine, model="tiny-flux-fill", **fields):
    return engine.generate(GenerationRequest(**{"model": model, "prompt": PROMPT, "seed": 3, **fields}))


@pytest.fixture(scope="module")
def init():
    return noise_image()


@pytest.fixture(scope="module")
def mask():
    return box_mask((16, 16, 48, 48))


@pytest.fixture(scope="module")
def bare_fill(tiny_bucket):
    """Plain diffusers: FluxFillPipeline on the tiny Fill folder, called as its documentation shows."""
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(tiny_bucket / "tiny-flux-fill" / "diffusers", local_files_only=True,
                                            torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def run(**kwargs):
        call = {**CALL, "guidance_scale": 30.0, "generator": [torch.Generator("cpu").manual_seed(3)], **kwargs}
        with torch.inference_mode():
            return np.asarray(pipe(**call).images[0].convert("RGB"))

    return run


def test_fill_inpaint_equals_bare_flux_fill_pipeline(engine, bare_fill, init, mask):
    result = generate(engine, image=png(init), mask=png(mask), strength=1.0)
    assert result.request.guidance_scale == 30.0  # the Fill family's default (FLUX.1 Fill dev's model card)
    assert np.array_equal(pixels(result), bare_fill(image=init, mask_image=mask, strength=1.0))
    partial = generate(engine, image=png(init), mask=png(mask), strength=0.75, guidance_scale=10.0)
    assert np.array_equal(pixels(partial), bare_fill(image=init, mask_image=mask, strength=0.75, guidance_scale=10.0))


def test_fill_outpaints(engine, bare_fill, init):
    from sd_core.inpainting import outpaint_canvas

    result = generate(engine, image=png(init), outpaint={"right": 64}, strength=1.0)
    assert Image.open(io.BytesIO(result.images[0].data)).size == (128, 64)
    canvas, grown = outpaint_canvas(init, 0, 64, 0, 0)
    assert np.array_equal(pixels(result), bare_fill(image=canvas, mask_image=grown, strength=1.0, width=128))


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "^image: 'tiny-flux-fill' is a flux-fill model, which runs inpaint requests only, not txt2img; give an "
         "image and a mask, or outpaint$"),
    ({"image": "init"}, "^mask: 'tiny-flux-fill' is a flux-fill model, which runs inpaint requests only, not "
                        "img2img"),
    ({"image": "init", "mask": "mask", "negative_prompt": "blurry"}, "^negative_prompt: .*no negative prompt"),
])
def test_fill_refuses_what_it_cannot_run(engine, init, mask, fields, message):
    images = {"init": png(init), "mask": png(mask)}
    with pytest.raises(InvalidRequest, match=message):
        generate(engine, **{key: images.get(value, value) for key, value in fields.items()})


def test_a1111_inpaint_payload_on_fill(engine, bare_fill, init, mask):
    payload = {"prompt": PROMPT, "init_images": [png(init)], "mask": png(mask), "mask_blur": 0, "inpainting_fill": 1,
               "inpaint_full_res": False,
               "denoising_strength": 1.0, "sampler_name": "Euler", "steps": 4, "cfg_scale": 30, "seed": 3,
               "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-flux-fill"}}
    result = engine.generate(to_request(A1111Call("img2img", payload)))
    # A1111 pastes the result over the init image through the mask (the engine's inpainting overlay): the native
    # request with that overlay; bare FluxFillPipeline's pixels inside the mask, the init image's outside
    native = generate(engine, image=png(init), mask=png(mask), strength=1.0, inpaint_overlay=True)
    assert np.array_equal(pixels(result), pixels(native))
    inside = np.asarray(mask) > 0
    assert np.array_equal(pixels(result)[~inside], np.asarray(init)[~inside])
    assert np.array_equal(pixels(result)[inside], bare_fill(image=init, mask_image=mask, strength=1.0)[inside])
    defaults = {key: value for key, value in payload.items() if key not in ("inpainting_fill", "inpaint_full_res")}
    filled = engine.generate(to_request(A1111Call("img2img", defaults)))  # A1111's fill, only-masked crop
    assert np.array_equal(pixels(filled)[~inside], np.asarray(init)[~inside])
    with pytest.raises(InvalidRequest, match="^mask: 'tiny-flux-fill' is a flux-fill model"):
        engine.generate(to_request(A1111Call("img2img", {k: v for k, v in payload.items() if k != "mask"})))


def test_single_file_transformer_equals_the_folder_model(engine):
    single = generate(engine, model="tiny-flux-single")
    assert np.array_equal(pixels(single), pixels(generate(engine, model="tiny-flux")))


def test_detection():
    assert detect_architecture(["single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"]) == "flux"
    assert detect_architecture(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]) == "flux"
    assert not FAMILIES["flux-fill"].detect(["double_blocks.0.img_attn.qkv.weight"])  # same names: a manifest's


def test_unconvertible_single_file_is_refused_clearly(make_engine, engine_settings, tmp_path):
    """diffusers' BFL converter hard-codes FLUX.1's width: a file it cannot map is a ManifestError, not a crash."""
    weights = tmp_path / "broken.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32)}, weights)
    models = tmp_path / "models"
    models.mkdir()
    spec = yaml.safe_load((engine_settings.models_dir / "tiny-flux-single.yaml").read_text())
    (models / "broken.yaml").write_text(yaml.safe_dump({**spec, "name": "broken", "uri": str(weights)}))
    with pytest.raises(ManifestError, match="^'broken.safetensors' is not a FLUX.1 transformer checkpoint "
                                            "that diffusers can load with its config folder's"):
        make_engine(models_dir=models).generate(GenerationRequest(model="broken", prompt=PROMPT))


@pytest.fixture(scope="module")
def server(tiny_bucket, tmp_path_factory):
    depth = tmp_path_factory.mktemp("variants") / "depth.safetensors"  # FLUX.1 Depth's shapes, tiny: 2 x 16 in
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32), "img_in.weight": torch.zeros(32, 32),
               "final_layer.linear.weight": torch.zeros(16, 32)}, depth)
    files = {"/flux-finetune.safetensors": tiny_bucket / "tiny-flux" / "tiny-flux-transformer.safetensors",
             "/flux-fill.safetensors": tiny_bucket / "tiny-flux-fill/diffusers/transformer/"
                                       "diffusion_pytorch_model.safetensors",
             "/flux-depth.safetensors": depth}

    class Handler(FileHandler):
        def do_GET(self):
            path = files.get(self.path.split("?", 1)[0])
            if path is not None:
                self.send_file(path.read_bytes())
            else:
                self.send_body(404, b"not found")

    with serving(Handler) as httpd:
        yield httpd.url


def test_flux_transformer_url_is_detected_and_loaded(make_engine, engine, server, tmp_path):
    url = f"{server}/flux-finetune.safetensors"
    url_engine = make_engine(url_allowed_hosts=("127.0.0.1",), cache_dir=tmp_path / "cache")
    manifest = url_engine.model_urls.resolve(url)
    assert (manifest.name, manifest.architecture, manifest.config_uri.endswith("tiny-flux/base/")) == (
        url_label(url), "flux", True)
    result = url_engine.generate(GenerationRequest(model=url, prompt=PROMPT, seed=3))
    assert result.request.max_sequence_length == 32  # the catalog's FLUX single-file model's defaults
    assert np.array_equal(pixels(result), pixels(generate(engine, model="tiny-flux")))


def test_fill_transformer_as_a_single_file(engine, init, mask):
    """A Fill fine-tune's transformer file on the Fill base folder (here the tiny Fill folder's own transformer)."""
    fields = {"image": png(init), "mask": png(mask), "strength": 1.0}
    single = generate(engine, model="tiny-flux-fill-single", **fields)
    assert np.array_equal(pixels(single), pixels(generate(engine, **fields)))


def test_fill_file_by_url_is_detected_by_its_input_width(make_engine, engine, server, tmp_path, init, mask):
    """A Fill transformer has FLUX's names; its 288 input channels (2 x 16 + 256) say Fill: the catalog's single-file
    Fill model lends its folder and defaults (guidance 30)."""
    url = f"{server}/flux-fill.safetensors"
    url_engine = make_engine(url_allowed_hosts=("127.0.0.1",), cache_dir=tmp_path / "cache")
    assert url_engine.model_urls.resolve(url).architecture == "flux-fill"
    fields = {"image": png(init), "mask": png(mask), "strength": 1.0}
    result = url_engine.generate(GenerationRequest(model=url, prompt=PROMPT, seed=3, **fields))
    assert result.request.guidance_scale == 30.0
    assert np.array_equal(pixels(result), pixels(generate(engine, **fields)))
    with pytest.raises(InvalidRequest, match="^image: 'url-[0-9a-f]{16}' is a flux-fill model, which runs inpaint"):
        url_engine.generate(GenerationRequest(model=url, prompt=PROMPT))


def test_other_flux_variants_by_url_are_refused(make_engine, server, tmp_path):
    """FLUX.1 Canny / Depth take twice the latent channels (control latents beside the noise): not run here."""
    url_engine = make_engine(url_allowed_hosts=("127.0.0.1",), cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidRequest, match="^model: http://127.0.0.1:[0-9]+/flux-depth.safetensors: a FLUX "
                                             "transformer taking 32 input channels for 16 output ones is neither "
                                             "FLUX.1 \\(16\\) nor FLUX.1 Fill \\(288\\)"):
        url_engine.model_urls.resolve(f"{server}/flux-depth.safetensors")


def test_warm_up_of_a_fill_model_inpaints(engine):
    from sd_core.warmup import WarmUp

    warm = WarmUp(engine)
    assert warm.request(engine.catalog.get("tiny-flux-fill"), ["tiny-flux-fill"]).mode == "inpaint"
    assert set(warm.run(["tiny-flux-fill"])) == {"tiny-flux-fill"}  # a txt2img warm-up would be refused
