"""devtools/tiny_models.py: layout, determinism, single-file == diffusers folder, LoRAs that load and act."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from devtools import tiny_models as builder

ARCHS = ("sd15", "sdxl")
COMPONENTS = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline


def load(bucket: Path, arch: str, form: str):
    """A fresh pipeline from the diffusers folder or from the single-file checkpoint + config folder."""
    root = bucket / f"tiny-{arch}"
    cls = pipeline_class(arch)
    if form == "diffusers":
        pipe = cls.from_pretrained(root / "diffusers", local_files_only=True)
    else:
        pipe = cls.from_single_file(
            str(root / f"tiny-{arch}.safetensors"), config=str(root / "config"), local_files_only=True
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, prompt: str = "a photo of a cat", seed: int = 1) -> np.ndarray:
    import torch

    generator = torch.Generator().manual_seed(seed)
    result = pipe(
        prompt, num_inference_steps=2, height=64, width=64, guidance_scale=5.0, generator=generator, output_type="np"
    )
    return result.images[0]


@pytest.fixture(scope="module")
def pipes(tiny_bucket):
    """Pipelines loaded once per module, by (arch, form). Tests that add LoRAs must unload them again."""
    cache = {}

    def get(arch: str, form: str = "diffusers"):
        if (arch, form) not in cache:
            cache[arch, form] = load(tiny_bucket, arch, form)
        return cache[arch, form]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_layout(tiny_bucket, arch):
    root = tiny_bucket / f"tiny-{arch}"
    index = json.loads((root / "diffusers" / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class(arch).__name__
    for component in COMPONENTS[arch]:
        assert index[component][0] is not None, component
        assert (root / "diffusers" / component).is_dir(), component
        assert (root / "config" / component).is_dir(), component
    if arch == "sd15":
        assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    weights = sorted(p.relative_to(root / "diffusers").as_posix() for p in (root / "diffusers").rglob("*.safetensors"))
    expected = [
        f"{c}/{'model' if c.startswith('text') else 'diffusion_pytorch_model'}.safetensors"
        for c in COMPONENTS[arch]
        if not c.startswith(("tokenizer", "scheduler"))
    ]
    assert weights == sorted(expected)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (root / "diffusers" / "tokenizer" / name).is_file()
    config_files = [p for p in (root / "config").rglob("*") if p.is_file()]
    assert not [p for p in config_files if p.suffix in (".safetensors", ".bin")]
    assert sum(p.stat().st_size for p in config_files) < 64 * 1024
    assert (root / f"tiny-{arch}.safetensors").is_file()
    for kind in ("peft", "kohya"):
        assert (tiny_bucket / "loras" / f"tiny-{arch}-{kind}.safetensors").is_file()
    from safetensors.torch import load_file

    embedding = load_file(tiny_bucket / "embeddings" / f"tiny-{arch}-neg.safetensors")  # A1111's layouts
    expected_shapes = {"clip_l": (2, 32), "clip_g": (2, 64)} if arch == "sdxl" else {"emb_params": (2, 32)}
    assert {key: tuple(tensor.shape) for key, tensor in embedding.items()} == expected_shapes


@pytest.mark.parametrize("arch", ARCHS)
def test_single_file_uses_original_key_layout(tiny_bucket, arch):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    checkpoint = load_file(tiny_bucket / f"tiny-{arch}" / f"tiny-{arch}.safetensors")
    prefixes = {key.split(".")[0] for key in checkpoint}
    if arch == "sd15":
        assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in checkpoint
    else:
        assert prefixes == {"model", "first_stage_model", "conditioner"}
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in checkpoint
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in checkpoint
    # What diffusers' loader would pick when no config folder is given.
    assert infer_diffusers_model_type(checkpoint) == {"sd15": "v1", "sdxl": "xl_base"}[arch]


def test_tokenizer_is_clip_like(tiny_bucket):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers" / "tokenizer")
    assert tokenizer.model_max_length == 77
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A photo of a cat, masterpiece").input_ids)
    assert tokens == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        ",</w>",
        "masterpiece</w>",
        "<|endoftext|>",
    ]
    assert tokenizer.decode(tokenizer("ünïcödé 東京").input_ids, skip_special_tokens=True) == "ünïcödé 東京"
    sdxl_2 = CLIPTokenizer.from_pretrained(tiny_bucket / "tiny-sdxl" / "diffusers" / "tokenizer_2")
    assert (sdxl_2.pad_token, sdxl_2.pad_token_id) == ("!", 0)  # as real SDXL's second tokenizer


def test_build_is_deterministic(tiny_bucket, tmp_path):
    builder.build_tiny_models(tmp_path / "again", archs=("sd15",), seed=0)
    assert tree_hashes(tmp_path / "again" / "tiny-sd15") == tree_hashes(tiny_bucket / "tiny-sd15")
    for kind in ("peft", "kohya"):
        name = f"loras/tiny-sd15-{kind}.safetensors"
        assert sha256(tmp_path / "again" / name) == sha256(tiny_bucket / name)
    name = "embeddings/tiny-sd15-neg.safetensors"
    assert sha256(tmp_path / "again" / name) == sha256(tiny_bucket / name)
    for variant in ("a", "b"):  # the tiny ControlNets (devtools/tiny_controlnet.py)
        name = f"controlnets/tiny-sd15-control-{variant}"
        assert tree_hashes(tmp_path / "again" / name) == tree_hashes(tiny_bucket / name)
    # the tiny SD3 model (devtools/tiny_sd3.py, built with every arch): folder, single file and config
    assert tree_hashes(tmp_path / "again" / "tiny-sd3") == tree_hashes(tiny_bucket / "tiny-sd3")
    name = "loras/tiny-sd3-peft.safetensors"
    assert sha256(tmp_path / "again" / name) == sha256(tiny_bucket / name)
    name = "controlnets/tiny-sd3-control"  # devtools/tiny_sd3_controlnet.py
    assert tree_hashes(tmp_path / "again" / name) == tree_hashes(tiny_bucket / name)
    builder.build_tiny_models(tmp_path / "other", archs=("sd15",), seed=1)
    name = "tiny-sd15/tiny-sd15.safetensors"
    assert sha256(tmp_path / "other" / name) != sha256(tiny_bucket / name)


@pytest.mark.parametrize("arch", ARCHS)
def test_single_file_matches_diffusers_folder(pipes, arch):
    folder, single = pipes(arch, "diffusers"), pipes(arch, "single_file")
    for name in COMPONENTS[arch]:
        if name.startswith(("tokenizer", "scheduler")):
            continue
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(bool((a[k] == b[k]).all()) for k in a), f"{name}: weights differ"
    base = image(folder)
    assert np.abs(base - image(single)).max() < 1e-4
    # Not degenerate: the image varies, and depends on seed and prompt.
    assert base.std() > 0.05
    assert np.abs(base - image(folder, seed=2)).max() > 0.1
    assert np.abs(base - image(folder, prompt="an old red horse")).max() > 0.02


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # two adapters on purpose
@pytest.mark.parametrize("arch", ARCHS)
def test_loras_load_change_output_and_unload(tiny_bucket, pipes, arch):
    pipe = pipes(arch)
    base = image(pipe)
    try:
        for kind in ("peft", "kohya"):
            pipe.load_lora_weights(
                tiny_bucket / "loras", weight_name=f"tiny-{arch}-{kind}.safetensors", adapter_name=kind
            )
        # Every component took its part: the text encoders' outputs move too.
        encoders = ["text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
        assert all(getattr(pipe, name).peft_config.keys() == {"peft", "kohya"} for name in encoders)
        pipe.set_adapters(["peft"], [1.0])
        with_peft = image(pipe)
        assert np.abs(with_peft - base).max() > 0.05
        pipe.set_adapters(["kohya"], [1.0])
        with_kohya = image(pipe)
        assert np.abs(with_kohya - base).max() > 0.05
        # The kohya file holds the same matrices at alpha 2 / rank 4: the peft LoRA at weight 0.5.
        pipe.set_adapters(["peft"], [0.5])
        assert np.abs(image(pipe) - with_kohya).max() < 1e-4
    finally:
        pipe.unload_lora_weights()
    assert np.array_equal(image(pipe), base)


@pytest.mark.parametrize(("arch", "other"), [("sd15", "sdxl"), ("sdxl", "sd15")])
@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_lora_of_other_architecture_errors(tiny_bucket, pipes, arch, other, kind):
    pipe = pipes(arch)
    base = image(pipe)
    with pytest.raises((RuntimeError, ValueError)):
        pipe.load_lora_weights(
            tiny_bucket / "loras", weight_name=f"tiny-{other}-{kind}.safetensors", adapter_name="wrong"
        )
    pipe.unload_lora_weights()
    assert np.array_equal(image(pipe), base)
