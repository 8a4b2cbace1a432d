"""The real-model catalog (catalog/*.yaml): manifests parse, name registered families, pin hf:// revisions, and every
file a diffusers load of them reads exists in the repository's published layout. No test reaches the hub."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sd_core import families
from sd_core.manifests import ModelCatalog, load_manifest
from sd_core.settings import Settings
from sd_core.storage.uris import parse_uri

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "catalog"
PENDING_FAMILIES = {"sd3", "flux"}  # written in parallel (sd_core/families/sd3.py, flux.py): skipped until registered

_TOK_CLIP = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
_TOK_T5 = ("special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json")


def _files(folder: str, *names: str) -> list[str]:
    return [f"{folder}/{name}" for name in names]


def _fp16(folder: str, stem: str) -> list[str]:
    return _files(folder, "config.json", f"{stem}.safetensors", f"{stem}.fp16.safetensors")


def _shards(folder: str, stem: str, count: int, variant: str = "") -> list[str]:
    tag = f".{variant}" if variant else ""
    index = f"{stem}.safetensors.index{tag}.json"
    return _files(folder, index, *(f"{stem}{tag}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)))


# The repositories' published file layouts (the diffusers part; single-file checkpoints, ONNX/OpenVINO/Flax exports
# and the pickle .bin copies are listed where they sit beside them, so that the check sees what a loader must skip).
# Sources: the hub's file trees as mirrored in public code (Atharva2099/WikiFace HF_listings/*/metadata.json for
# SD1.5 and SDXL base; the diffusers FLUX file set listed in an mflux model registry; SD3.5 Large's tree as listed
# by a hub-size survey script and by SD3.5 loaders (text_encoder_3 shards, fp16 variants)), and diffusers' docs.
_SDXL_TOKENIZERS = _files("tokenizer", *_TOK_CLIP) + _files("tokenizer_2", *_TOK_CLIP)
_SD3_COMMON = (["model_index.json", "scheduler/scheduler_config.json"]
               + _fp16("text_encoder", "model") + _fp16("text_encoder_2", "model")
               + ["text_encoder_3/config.json"] + _shards("text_encoder_3", "model", 2)
               + _shards("text_encoder_3", "model", 2, "fp16")
               + _files("tokenizer", *_TOK_CLIP) + _files("tokenizer_2", *_TOK_CLIP) + _files("tokenizer_3", *_TOK_T5)
               + _files("vae", "config.json", "diffusion_pytorch_model.safetensors")
               + ["text_encoders/clip_g.safetensors", "text_encoders/clip_l.safetensors",
                  "text_encoders/t5xxl_fp16.safetensors"])
_FLUX = (["model_index.json", "scheduler/scheduler_config.json", "ae.safetensors"]
         + _files("text_encoder", "config.json", "model.safetensors")
         + ["text_encoder_2/config.json"] + _shards("text_encoder_2", "model", 2)
         + _files("tokenizer", *_TOK_CLIP) + _files("tokenizer_2", *_TOK_T5)
         + ["transformer/config.json"] + _shards("transformer", "diffusion_pytorch_model", 3)
         + _files("vae", "config.json", "diffusion_pytorch_model.safetensors"))

LAYOUTS: dict[str, list[str]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": (
        ["model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
         "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "v1-inference.yaml"]
        + _fp16("safety_checker", "model") + _files("safety_checker", "pytorch_model.bin", "pytorch_model.fp16.bin")
        + _fp16("text_encoder", "model") + _files("text_encoder", "pytorch_model.bin", "pytorch_model.fp16.bin")
        + _files("tokenizer", *_TOK_CLIP)
        + _fp16("unet", "diffusion_pytorch_model")
        + _files("unet", "diffusion_pytorch_model.non_ema.safetensors", "diffusion_pytorch_model.bin")
        + _fp16("vae", "diffusion_pytorch_model") + _files("vae", "diffusion_pytorch_model.bin")),
    "stabilityai/stable-diffusion-xl-base-1.0": (
        ["model_index.json", "scheduler/scheduler_config.json", "sd_xl_base_1.0.safetensors",
         "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors"]
        + _fp16("text_encoder", "model") + _files("text_encoder", "flax_model.msgpack", "openvino_model.bin")
        + _fp16("text_encoder_2", "model") + _files("text_encoder_2", "model.onnx", "model.onnx_data")
        + _SDXL_TOKENIZERS
        + _fp16("unet", "diffusion_pytorch_model") + _files("unet", "diffusion_flax_model.msgpack", "model.onnx")
        + _fp16("vae", "diffusion_pytorch_model") + _fp16("vae_1_0", "diffusion_pytorch_model")
        + _files("vae_decoder", "config.json", "model.onnx") + _files("vae_encoder", "config.json", "model.onnx")),
    "stabilityai/stable-diffusion-xl-refiner-1.0": (  # no text_encoder/tokenizer: model_index has them null
        ["model_index.json", "scheduler/scheduler_config.json", "sd_xl_refiner_1.0.safetensors"]
        + _fp16("text_encoder_2", "model") + _files("tokenizer_2", *_TOK_CLIP)
        + _fp16("unet", "diffusion_pytorch_model") + _fp16("vae", "diffusion_pytorch_model")),
    "stabilityai/sdxl-turbo": (
        ["model_index.json", "scheduler/scheduler_config.json", "sd_xl_turbo_1.0.safetensors",
         "sd_xl_turbo_1.0_fp16.safetensors"]
        + _fp16("text_encoder", "model") + _fp16("text_encoder_2", "model") + _SDXL_TOKENIZERS
        + _fp16("unet", "diffusion_pytorch_model") + _fp16("vae", "diffusion_pytorch_model")),
    "madebyollin/sdxl-vae-fp16-fix": [
        "config.json", "diffusion_pytorch_model.safetensors", "sdxl.vae.safetensors", "sdxl_vae.safetensors"],
    "stabilityai/stable-diffusion-3.5-medium": (
        _SD3_COMMON + ["sd3.5_medium.safetensors", "transformer/config.json",
                       "transformer/diffusion_pytorch_model.safetensors"]),
    "stabilityai/stable-diffusion-3.5-large": (
        _SD3_COMMON + ["sd3.5_large.safetensors", "transformer/config.json"]
        + _shards("transformer", "diffusion_pytorch_model", 2)),
    "stabilityai/stable-diffusion-3.5-large-turbo": (
        _SD3_COMMON + ["sd3.5_large_turbo.safetensors", "transformer/config.json"]
        + _shards("transformer", "diffusion_pytorch_model", 2)),
    "black-forest-labs/FLUX.1-schnell": _FLUX + ["flux1-schnell.safetensors"],
    "black-forest-labs/FLUX.1-dev": _FLUX + ["flux1-dev.safetensors"],
}

# Pipeline components per family, for the families not registered yet (diffusers' StableDiffusion3Pipeline and
# FluxPipeline __init__ arguments); registered families are asked for their pipeline class instead.
PENDING_COMPONENTS = {
    "sd3": ("scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
            "tokenizer_3", "transformer", "vae"),
    "flux": ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"),
}
_CONFIG_FILES = {"scheduler": ("scheduler_config.json",), "feature_extractor": ("preprocessor_config.json",)}
_NOT_LOADED = ("*.bin", "*.msgpack", "*.onnx", "*.pb")  # what the loader never reads (use_safetensors=True)


def pipeline_components(architecture: str) -> tuple[str, ...]:
    """The folders a diffusers pipeline of this family loads (its __init__'s module arguments)."""
    import inspect

    if architecture in PENDING_COMPONENTS and architecture not in families.NAMES:
        return PENDING_COMPONENTS[architecture]
    cls = families.family(architecture).pipeline_class("txt2img")
    return tuple(name for name in inspect.signature(cls.__init__).parameters if name not in ("self",))


def loaded_files(layout: list[str], variant: str | None, components: tuple[str, ...] | None) -> set[str]:
    """The files a diffusers from_pretrained(use_safetensors=True, variant=...) of this folder reads: model_index.json,
    each component's config / tokenizer files, and the weights diffusers' own variant selection picks
    (``variant_compatible_siblings``; a component without variant files falls back to its plain ones). A bare
    AutoencoderKL folder (components None) reads config.json and its weights. Raises ValueError when the variant or
    a component's weights are missing."""
    from diffusers.pipelines.pipeline_loading_utils import variant_compatible_siblings

    folders = sorted({path.split("/")[0] for path in layout if "/" in path})
    wanted = [f for f in folders if f in components] if components is not None else []
    candidates = [p for p in layout if p.split("/")[0] in wanted] if components is not None else layout
    picked, _ = variant_compatible_siblings(candidates, variant=variant, ignore_patterns=list(_NOT_LOADED))
    weights = {p for p in picked if p.endswith(".safetensors") or p.endswith(".json")}
    needed = {"model_index.json"} if components is not None else {"config.json"}
    for folder in wanted:
        files = [p for p in layout if p.startswith(folder + "/")]
        if folder in _CONFIG_FILES:
            needed |= {f"{folder}/{name}" for name in _CONFIG_FILES[folder]}
        elif folder.startswith("tokenizer"):
            needed |= {p for p in files if p.endswith((".json", ".txt", ".model"))}
        else:
            needed.add(f"{folder}/config.json")
            mine = {p for p in weights if p.startswith(folder + "/")}
            if not any(p.endswith(".safetensors") for p in mine):
                raise ValueError(f"{folder}: no safetensors weights (variant {variant})")
            needed |= mine
    if components is None:
        needed |= {p for p in weights if p.count(".") == 1 and p.startswith("diffusion_pytorch_model")}
    _check_shards(needed)
    return needed


def _check_shards(files: set[str]) -> None:
    """Every shard of a sharded weight file (…-00002-of-00003…) is there, as its index names them."""
    for path in files:
        found = re.search(r"-(\d{5})-of-(\d{5})\.", path)
        if found:
            for i in range(1, int(found.group(2)) + 1):
                sibling = path.replace(f"-{found.group(1)}-of-", f"-{i:05d}-of-")
                if sibling not in files:
                    raise ValueError(f"shard {sibling} is missing")


def hub_download(layout: list[str], manifest) -> set[str]:
    """The files of ``layout`` the worker's hub fetch asks snapshot_download for (sd_core.storage.verify's patterns
    for the components model_index.json names)."""
    from huggingface_hub.utils import filter_repo_objects

    from sd_core.storage.verify import hf_folder_patterns

    components = pipeline_components(manifest.architecture)
    named = sorted({p.split("/")[0] for p in layout if "/" in p and p.split("/")[0] in components})
    allow, ignore = hf_folder_patterns("", Settings(), named, manifest.variant)
    return set(filter_repo_objects(layout, allow_patterns=allow, ignore_patterns=ignore))


def hf_repo(uri: str) -> tuple[str, str | None, str]:
    loc = parse_uri(uri)
    assert loc.scheme == "hf", uri
    return loc.host, loc.revision, loc.path


def catalog_files() -> list[Path]:
    return sorted(CATALOG.glob("*.y*ml"))


def manifest_or_skip(path: Path):
    architecture = yaml.safe_load(path.read_text())["architecture"]
    if architecture in PENDING_FAMILIES and architecture not in families.NAMES:
        pytest.skip(f"the {architecture!r} family is not registered on this branch yet (written in parallel)")
    return load_manifest(path)


def test_the_catalog_has_the_issues_models():
    names = {yaml.safe_load(path.read_text())["name"] for path in catalog_files()}
    assert names == {"sd15", "sdxl-base", "sdxl-refiner", "sdxl-turbo", "sd35-medium", "sd35-large",
                     "sd35-large-turbo", "flux-schnell", "flux-dev"}
    architectures = {yaml.safe_load(path.read_text())["architecture"] for path in catalog_files()}
    assert architectures <= set(families.NAMES) | PENDING_FAMILIES


@pytest.mark.parametrize("path", catalog_files(), ids=lambda p: p.stem)
def test_catalog_manifest_pins_a_published_layout(path):
    manifest = manifest_or_skip(path)
    assert manifest.architecture in families.NAMES
    assert manifest.format == "diffusers" and manifest.uri.endswith("/")
    repo, revision, sub = hf_repo(manifest.uri)
    assert re.fullmatch(r"[0-9a-f]{40}", revision or ""), f"{path.name}: revision must be a full commit sha"
    assert sub == "" and repo in LAYOUTS
    assert "revision seen in" in path.read_text(), "say where the revision was found"
    files = loaded_files(LAYOUTS[repo], manifest.variant, pipeline_components(manifest.architecture))
    assert files <= set(LAYOUTS[repo])
    assert "model_index.json" in files and not any(f.endswith((".bin", ".ckpt", ".msgpack", ".onnx")) for f in files)
    if manifest.variant:  # the variant really is what is read where the repository has it
        assert any(f".{manifest.variant}." in f for f in files)
    # what the worker downloads (fetch_hf's patterns over the repository, filtered as snapshot_download filters)
    # holds every file the loader reads, and no other weights
    assert files <= (fetched := hub_download(LAYOUTS[repo], manifest))
    assert {f for f in fetched if f.endswith(".safetensors")} == {f for f in files if f.endswith(".safetensors")}
    for vae in manifest.vaes:
        vae_repo, vae_revision, _ = hf_repo(vae.uri)
        assert re.fullmatch(r"[0-9a-f]{40}", vae_revision or "") and vae.is_folder
        assert loaded_files(LAYOUTS[vae_repo], None, None) == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_catalog_defaults_follow_the_model_cards():
    by_name = {path.stem: yaml.safe_load(path.read_text()) for path in catalog_files()}
    turbo = by_name["sdxl-turbo"]["defaults"]
    assert (turbo["width"], turbo["num_inference_steps"], turbo["guidance_scale"]) == (512, 1, 0.0)
    assert by_name["flux-schnell"]["defaults"]["max_sequence_length"] == 256
    assert by_name["flux-dev"]["defaults"]["max_sequence_length"] == 512
    assert (by_name["flux-dev"]["defaults"]["guidance_scale"], by_name["flux-schnell"]["defaults"]["guidance_scale"]) \
        == (3.5, 0.0)
    assert by_name["sd35-large-turbo"]["defaults"]["num_inference_steps"] == 4
    assert by_name["sdxl-base"]["refiner"] == "sdxl-refiner"


def test_the_layout_check_fails_on_a_wrong_variant_or_a_missing_shard():
    flux = LAYOUTS["black-forest-labs/FLUX.1-dev"]
    with pytest.raises(ValueError):  # FLUX ships no fp16 files
        loaded_files(flux, "fp16", PENDING_COMPONENTS["flux"])
    without_a_shard = [p for p in flux if p != "transformer/diffusion_pytorch_model-00002-of-00003.safetensors"]
    with pytest.raises(ValueError, match="shard"):
        loaded_files(without_a_shard, None, PENDING_COMPONENTS["flux"])
    sdxl = LAYOUTS["stabilityai/stable-diffusion-xl-base-1.0"]
    components = pipeline_components("sdxl")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in loaded_files(sdxl, "fp16", components)
    assert "unet/diffusion_pytorch_model.safetensors" in loaded_files(sdxl, None, components)
    without_unet = [p for p in sdxl if not p.startswith("unet/diffusion")]
    with pytest.raises(ValueError, match="unet"):
        loaded_files(without_unet, "fp16", components)


def test_sd_catalog_dir_adds_the_catalog_to_the_models_dir(tmp_path):
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "sdxl-base.yaml").write_text(  # an operator's own manifest of a catalog name wins
        "name: sdxl-base\narchitecture: sdxl\nformat: diffusers\nuri: my-sdxl/\n")
    alone = ModelCatalog.from_settings(Settings(models_dir=mine))
    assert sorted(alone.manifests) == ["sdxl-base"]
    merged = ModelCatalog.from_settings(Settings(models_dir=mine, catalog_dir=CATALOG))
    assert {"sd15", "sdxl-base", "sdxl-refiner", "sdxl-turbo"} <= set(merged.manifests)
    assert merged.get("sdxl-base").uri == "my-sdxl/"
    assert merged.get("sdxl-refiner").uri.startswith("hf://stabilityai/stable-diffusion-xl-refiner-1.0@")
    # a shipped manifest of a family this build lacks is left out (logged), not a failed cold start
    pending = {p.stem for p in catalog_files() if yaml.safe_load(p.read_text())["architecture"] not in families.NAMES}
    assert not pending & set(merged.manifests)
    env = Settings.from_env({"SD_CATALOG_DIR": str(CATALOG), "SD_DEFAULT_MODEL": "sdxl-turbo"})
    assert env.catalog_dir == CATALOG
    assert ModelCatalog.from_settings(env).get(env.default_model).variant == "fp16"


@pytest.mark.parametrize("path", [p for p in catalog_files()
                                  if yaml.safe_load(p.read_text())["architecture"] in PENDING_COMPONENTS],
                         ids=lambda p: p.stem)
def test_sd3_and_flux_manifests_pin_a_published_layout_before_their_families_exist(path):
    raw = yaml.safe_load(path.read_text())
    repo, revision, sub = hf_repo(raw["uri"])
    assert re.fullmatch(r"[0-9a-f]{40}", revision or "") and sub == "" and raw["uri"].endswith("/")
    assert "revision seen in" in path.read_text()
    files = loaded_files(LAYOUTS[repo], raw.get("variant"), PENDING_COMPONENTS[raw["architecture"]])
    assert files <= set(LAYOUTS[repo]) and "transformer/config.json" in files
    assert not any(f.startswith(("text_encoders/", "sd3.5_", "flux1-")) for f in files)
    assert 1 <= raw["defaults"]["max_sequence_length"] <= 512


def test_the_images_ship_the_catalog():
    dockerfile = (REPO / "Dockerfile.runpod").read_text()
    assert "COPY catalog/ catalog/" in dockerfile and "SD_CATALOG_DIR=/app/catalog" in dockerfile
    cog = yaml.safe_load((REPO / "cog.yaml").read_text())
    assert "SD_CATALOG_DIR=/src/catalog" in cog["environment"]
    assert "catalog" not in (REPO / ".dockerignore").read_text().split()
