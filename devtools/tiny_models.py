"""Build tiny random-weight Stable Diffusion models (SD1.5 and SDXL) for tests and the demo, fully offline.

The models keep the real block topology of SD1.5 / SDXL and shrink only the widths, so that every loader path of
the real thing works on them: diffusers folders, single-file checkpoints in the original key layout, LoRAs in the
peft and kohya formats. Nothing is downloaded; the same seed gives byte-identical files.

Layout written under ``--out DIR`` (default ``./bucket``), for each architecture A in {sd15, sdxl}:

    DIR/tiny-A/diffusers/            complete diffusers folder (safetensors weights, no safety checker)
    DIR/tiny-A/tiny-A.safetensors    single-file checkpoint, original layout (CompVis/A1111 for sd15, SGM for sdxl)
    DIR/tiny-A/config/               the weight-less config folder ``from_single_file(..., config=...)`` needs
    DIR/loras/tiny-A-peft.safetensors   rank-4 LoRA (UNet + text encoders), peft keys, as save_lora_weights writes
    DIR/loras/tiny-A-kohya.safetensors  the same matrices in kohya's layout with alpha 2 (= the peft LoRA at 0.5)
    DIR/vaes/tiny-A-vae[.safetensors]   an alternate VAE, folder and single file (devtools/tiny_vae.py)
    DIR/embeddings/tiny-A-neg.safetensors  a 2-vector textual-inversion embedding, A1111 layout (tiny_embeddings.py)
    DIR/tiny-sdxl-refiner*/diffusers/   with sdxl: two tiny SDXL refiners (devtools/tiny_refiner.py)
    DIR/tiny-sd15-inpaint/diffusers/    with sd15: a 9-channel inpainting UNet on tiny-sd15 (devtools/tiny_inpaint.py)
    DIR/tiny-sd3/diffusers/, DIR/loras/tiny-sd3-peft.safetensors   a tiny SD3 model and LoRA (devtools/tiny_sd3.py)

and, once, two tiny safety checkers (diffusers' StableDiffusionSafetyChecker + CLIPImageProcessor config, laid out as
the real ``CompVis/stable-diffusion-safety-checker`` folder), equal but for their thresholds:

    DIR/tiny-safety-checker/passes/     never flags an image (thresholds above any cosine similarity)
    DIR/tiny-safety-checker/flags/      flags every image (thresholds below any cosine similarity)

Usage: ``python -m devtools.tiny_models --out ./bucket [--arch sd15 --arch sdxl] [--seed 0]``
or, from Python, ``build_tiny_models(Path("bucket"))``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

# Must be set before huggingface_hub / diffusers / transformers are imported: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.utils import logging as transformers_logging  # noqa: E402

from devtools.tiny_controlnet import write_tiny_controlnets  # noqa: E402
from devtools.tiny_depth import write_tiny_depth  # noqa: E402
from devtools.tiny_embeddings import write_embeddings  # noqa: E402
from devtools.tiny_ip_adapter import write_tiny_ip_adapter  # noqa: E402
from devtools.tiny_lineart_anime import write_tiny_lineart_anime  # noqa: E402
from devtools.tiny_preprocessors import write_tiny_preprocessors  # noqa: E402
from devtools.tiny_refiner import build_refiners  # noqa: E402
from devtools.tiny_upscaler import write_tiny_upscalers  # noqa: E402

ARCHS = ("sd15", "sdxl")
MAX_TOKENS = 77  # CLIP's context length, as in the real models
LORA_RANK = 4
KOHYA_ALPHA = 2.0  # kohya file: same matrices as the peft file, scale alpha/rank = 0.5

# ---------------------------------------------------------------------------------------------------------------
# Widths. Real values in comments; depths and block types are the real ones, widths are cut down.
# ---------------------------------------------------------------------------------------------------------------
SD15_TEXT = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4)  # 768/3072/12/12
SDXL_TEXT_1 = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4)  # as SD1.5
# bigG: 1280/5120/32/20. Its width must differ from encoder 1: diffusers' single-file loader tells the two encoders
# apart by the width of their position embeddings. Depth must be >= 10: diffusers detects SDXL base by the key
# conditioner.embedders.1.model.transformer.resblocks.9.*.
SDXL_TEXT_2 = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4, projection_dim=64
)

SD15_UNET = dict(
    block_out_channels=(32, 32, 64, 64),  # (320, 640, 1280, 1280)
    attention_head_dim=8,  # the real value (SD1.5 means 8 heads by it)
    cross_attention_dim=SD15_TEXT["hidden_size"],  # 768
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    sample_size=8,  # 64 (512 px); 8 latents = 64 px default image size
)
SDXL_ADD_TIME_DIM = 8  # 256
SDXL_UNET = dict(
    block_out_channels=(32, 64, 64),  # (320, 640, 1280)
    attention_head_dim=(2, 4, 4),  # (5, 10, 20): 16-wide heads instead of 64
    transformer_layers_per_block=(1, 1, 2),  # (1, 2, 10); block 2 keeps more than one transformer layer
    cross_attention_dim=SDXL_TEXT_1["hidden_size"] + SDXL_TEXT_2["hidden_size"],  # 768 + 1280
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_ADD_TIME_DIM,
    projection_class_embeddings_input_dim=SDXL_TEXT_2["projection_dim"] + 6 * SDXL_ADD_TIME_DIM,  # 2816
    sample_size=8,  # 128 (1024 px)
)
VAE = dict(  # real: (128, 256, 512, 512); 4 levels = 8x downscale as in the real VAE
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=64,  # 512 / 1024
)
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}

# The scheduler configs the real repos ship (SD's scaled_linear 0.00085..0.012 over 1000 training steps).
SCHEDULER_COMMON = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)

# Seed offsets per component, so that changing one component leaves the others' weights unchanged.
SEED_OFFSETS = {"text_encoder": 1, "text_encoder_2": 2, "unet": 3, "vae": 4, "lora": 5, "safety_checker": 6}

# The safety checker: a CLIP vision tower (real: ViT-L/14 at 224 px, 1024/4096/24/16, projection 768) whose image
# embedding is compared with 17 concept and 3 "special care" embeddings; an image is flagged when a cosine similarity
# exceeds that concept's threshold. Cosine similarities lie in [-1, 1], so thresholds of +2 never fire and -2 always do.
SAFETY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                     patch_size=8)
SAFETY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)  # config only
SAFETY_PROJECTION_DIM = 16  # 768
SAFETY_THRESHOLDS = {"passes": 2.0, "flags": -2.0}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: a tiny byte-level BPE vocabulary in CLIP's format, made up on the spot.
# ---------------------------------------------------------------------------------------------------------------
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words that get whole-word tokens (the rest of the text falls back to one token per character).
TOKENIZER_WORDS = (
    "a an the of and in on with at by for to is photo picture painting portrait drawing render cat dog horse bird "
    "man woman girl boy person face city street house forest mountain sea sky sun moon night day red green blue "
    "black white gold light dark big small old young beautiful detailed high quality best worst low blurry ugly "
    "masterpiece style art digital oil watercolor cinematic lighting background"
).split()


def byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible map of the 256 byte values onto printable characters (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    for extra, byte in enumerate(byte for byte in range(256) if byte not in table):
        table[byte] = chr(256 + extra)
    return table


def apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: keep merging the adjacent pair with the best (lowest) rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), index) for index, pair in enumerate(pairwise(symbols))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:index] + [symbols[index] + symbols[index + 1]] + symbols[index + 2 :]
    return symbols


def tokenizer_vocab_and_merges(words=TOKENIZER_WORDS) -> tuple[dict[str, int], list[str]]:
    """CLIP-style vocabulary: every byte (alone and word-final), merges that make each listed word one token,
    then BOS/EOS. A merge added for a later word never outranks the merges of an earlier one, so every listed
    word stays a single token."""
    chars = list(byte_to_unicode().values())
    tokens = chars + [char + "</w>" for char in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:  # join what is left from the left
            ranks[(symbols[0], symbols[1])] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{left} {right}" for left, right in ranks]


def write_tokenizer(directory: Path, pad_token: str) -> None:
    """vocab.json + merges.txt + tokenizer_config.json, the files a real SD tokenizer folder holds."""
    vocab, merges = tokenizer_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Random-weight components
# ---------------------------------------------------------------------------------------------------------------
def text_encoder_config(widths: dict, vocab: dict[str, int], pad_token: str, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],  # not 2: pooling looks for this id (the legacy argmax rule applies only to id 2)
        pad_token_id=vocab[pad_token],
        **widths,
    )


def unet_config(arch: str) -> dict:
    return dict(SD15_UNET if arch == "sd15" else SDXL_UNET, in_channels=4, out_channels=4)


def vae_config(arch: str) -> dict:
    config = dict(VAE, in_channels=3, out_channels=3, scaling_factor=VAE_SCALING[arch])
    if arch == "sdxl":
        config["force_upcast"] = True  # as the real SDXL VAE
    return config


def scheduler(arch: str):
    if arch == "sd15":  # SD1.5 ships PNDM ("PLMS")
        return PNDMScheduler(**SCHEDULER_COMMON, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon")
    return EulerDiscreteScheduler(  # SDXL ships Euler
        **SCHEDULER_COMMON, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon"
    )


def seeded(seed: int, component: str) -> None:
    """Seed torch's global RNG (which model constructors draw from) for one component."""
    torch.manual_seed(seed * 100 + SEED_OFFSETS[component])


def build_pipeline(arch: str, seed: int, tokenizer_dir: Path):
    """A pipeline of the given architecture with fresh random weights (tokenizers read from tokenizer_dir)."""
    vocab, _ = tokenizer_vocab_and_merges()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer", local_files_only=True)
    seeded(seed, "text_encoder")
    if arch == "sd15":
        text_encoder = CLIPTextModel(text_encoder_config(SD15_TEXT, vocab, EOS, "quick_gelu"))
    else:
        text_encoder = CLIPTextModel(text_encoder_config(SDXL_TEXT_1, vocab, EOS, "quick_gelu"))
    seeded(seed, "unet")
    unet = UNet2DConditionModel(**unet_config(arch))
    seeded(seed, "vae")
    vae = AutoencoderKL(**vae_config(arch))
    if arch == "sd15":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler(arch),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer_2", local_files_only=True)
    seeded(seed, "text_encoder_2")
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(SDXL_TEXT_2, vocab, "!", "gelu"))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler(arch),
    )


# ---------------------------------------------------------------------------------------------------------------
# diffusers -> original (CompVis / SGM) key layout, the inverse of diffusers' single-file conversion
# ---------------------------------------------------------------------------------------------------------------
UNET_RESNET_NAMES = {  # diffusers ResnetBlock2D -> ldm ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_map(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers UNet module path -> (original module path, renames of its children)."""
    has_attention = ["CrossAttn" in block for block in config["down_block_types"]]
    up_has_attention = ["CrossAttn" in block for block in config["up_block_types"]]
    layers, blocks = config["layers_per_block"], len(config["block_out_channels"])
    modules = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "add_embedding.linear_1": ("label_emb.0.0", {}),
        "add_embedding.linear_2": ("label_emb.0.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET_NAMES),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET_NAMES),
    }
    index = 1  # input_blocks.0 is conv_in
    for block in range(blocks):
        for layer in range(layers):
            modules[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{index}.0", UNET_RESNET_NAMES)
            if has_attention[block]:
                modules[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if block < blocks - 1:
            modules[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    index = 0
    for block in range(blocks):
        for layer in range(layers + 1):
            modules[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{index}.0", UNET_RESNET_NAMES)
            if up_has_attention[block]:
                modules[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
            if layer == layers and block < blocks - 1:
                position = 2 if up_has_attention[block] else 1
                modules[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{index}.{position}.conv", {})
            index += 1
    return modules


def vae_module_map(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers AutoencoderKL module path -> (original module path, renames of its children)."""
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    modules = {name: (name, {}) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        modules[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        modules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET_NAMES)
        modules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET_NAMES)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION_NAMES)
    for block in range(blocks):
        for layer in range(layers):
            modules[f"encoder.down_blocks.{block}.resnets.{layer}"] = (
                f"encoder.down.{block}.block.{layer}",
                VAE_RESNET_NAMES,
            )
        if block < blocks - 1:
            modules[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = (f"encoder.down.{block}.downsample.conv", {})
        original = blocks - 1 - block  # the original decoder counts its levels from the bottom up
        for layer in range(layers + 1):
            modules[f"decoder.up_blocks.{block}.resnets.{layer}"] = (
                f"decoder.up.{original}.block.{layer}",
                VAE_RESNET_NAMES,
            )
        if block < blocks - 1:
            modules[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = (f"decoder.up.{original}.upsample.conv", {})
    return modules


def rename_module_path(path: str, modules: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Map a diffusers parameter or module path through a module map (longest matching prefix wins)."""
    for prefix in sorted(modules, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + "."):
            original, children = modules[prefix]
            rest = path[len(prefix) :].lstrip(".")
            for old, new in children.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{original}.{rest}" if rest else original
    raise KeyError(f"{path}: no original name (diffusers added a module this script does not know)")


def unet_to_original(state_dict: dict, config: dict, prefix: str = "model.diffusion_model.") -> dict:
    modules = unet_module_map(config)
    return {prefix + rename_module_path(key, modules): value for key, value in state_dict.items()}


def vae_to_original(state_dict: dict, config: dict, prefix: str = "first_stage_model.") -> dict:
    modules = vae_module_map(config)
    converted = {}
    for key, value in state_dict.items():
        original = rename_module_path(key, modules)
        if ".mid.attn_1." in original and original.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        converted[prefix + original] = value
    return converted


def clip_to_original(state_dict: dict, prefix: str) -> dict:
    """transformers CLIPTextModel -> the HF-CLIP layout the original checkpoints embed (with ``text_model.``)."""
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): v for key, v in state_dict.items()
    }


OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_to_original(state_dict: dict, prefix: str) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP layout (fused in_proj, transposed text_projection)."""
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    converted = {prefix + "text_projection": state_dict["text_projection.weight"].T}
    layer_prefix = "text_model.encoder.layers."
    for key, value in state_dict.items():
        if key in fixed:
            converted[prefix + fixed[key]] = value
        elif key.startswith(layer_prefix):
            index, rest = key[len(layer_prefix) :].split(".", 1)
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.q_proj."):  # q, k, v are one fused projection in OpenCLIP
                kind = rest.rsplit(".", 1)[1]  # weight / bias
                parts = [state_dict[f"{layer_prefix}{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                converted[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            else:
                for old, new in OPEN_CLIP_LAYER_NAMES.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                else:
                    raise KeyError(f"no OpenCLIP name for {key}")
                converted[block + rest] = value
        elif key != "text_projection.weight":
            raise KeyError(f"no OpenCLIP name for {key}")
    return converted


def original_checkpoint(pipe, arch: str) -> dict[str, torch.Tensor]:
    """The pipeline's weights as one state dict in the original (CompVis for sd15, SGM for sdxl) layout."""
    checkpoint = {}
    checkpoint.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    checkpoint.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    if arch == "sd15":
        checkpoint.update(clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    else:
        checkpoint.update(clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        checkpoint.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {key: value.detach().to(torch.float32).contiguous().clone() for key, value in checkpoint.items()}


# ---------------------------------------------------------------------------------------------------------------
# LoRAs
# ---------------------------------------------------------------------------------------------------------------
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def random_lora(model, targets: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Attach a rank-4 peft LoRA with random (non-zero) A and B to model; return its peft state dict.

    Text-encoder keys get the ``text_model.`` prefix whatever the transformers version: LoRAs trained before
    transformers 5 (nearly all in the wild) carry it, and diffusers strips it when the model has none.
    """
    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                fan_in = parameter.shape[1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
    layers = {}
    for key, value in get_peft_model_state_dict(model).items():
        if key.startswith("encoder."):  # a flattened transformers-5 CLIPTextModel
            key = "text_model." + key
        layers[key] = value.detach().clone().contiguous()
    return layers


def kohya_lora(peft_layers: dict[str, dict[str, torch.Tensor]], arch: str, unet_layout: dict) -> dict:
    """kohya (sd-scripts) layout of the same LoRA: lora_unet_* / lora_te*_* names, lora_down/lora_up, alpha.

    sd-scripts trains SD1.x on diffusers-named UNet modules and SDXL on the original SGM UNet, and always names
    text-encoder modules with the ``text_model.`` prefix; the names follow that.
    """
    te_names = {"text_encoder": "lora_te1" if arch == "sdxl" else "lora_te", "text_encoder_2": "lora_te2"}
    modules = unet_module_map(unet_layout)
    kohya = {}
    for component, layers in peft_layers.items():
        for key, value in layers.items():
            module, kind = key.rsplit(".lora_", 1)  # kind: "A.weight" / "B.weight"
            if component == "unet":
                name = rename_module_path(module, modules) if arch == "sdxl" else module
                name = "lora_unet_" + name.replace(".", "_")
            else:
                name = f"{te_names[component]}_" + module.replace(".", "_")
            kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
            kohya[f"{name}.alpha"] = torch.tensor(KOHYA_ALPHA)
    return kohya


def write_loras(pipe, arch: str, directory: Path, seed: int) -> dict[str, Path]:
    """Write tiny-A-peft.safetensors and tiny-A-kohya.safetensors. Mutates pipe (adds adapters): call last."""
    generator = torch.Generator().manual_seed(seed * 100 + SEED_OFFSETS["lora"])
    layers = {"unet": random_lora(pipe.unet, UNET_LORA_TARGETS, generator)}
    layers["text_encoder"] = random_lora(pipe.text_encoder, TEXT_LORA_TARGETS, generator)
    if arch == "sdxl":
        layers["text_encoder_2"] = random_lora(pipe.text_encoder_2, TEXT_LORA_TARGETS, generator)
    directory.mkdir(parents=True, exist_ok=True)
    peft_name, kohya_name = f"tiny-{arch}-peft.safetensors", f"tiny-{arch}-kohya.safetensors"
    type(pipe).save_lora_weights(
        directory,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        **({"text_encoder_2_lora_layers": layers["text_encoder_2"]} if arch == "sdxl" else {}),
        weight_name=peft_name,
    )
    # One metadata entry only: safetensors writes metadata in hash-map order, so several would break determinism.
    save_file(
        kohya_lora(layers, arch, pipe.unet.config), directory / kohya_name, metadata={"ss_network_dim": str(LORA_RANK)}
    )
    return {f"lora-{arch}-peft": directory / peft_name, f"lora-{arch}-kohya": directory / kohya_name}


# ---------------------------------------------------------------------------------------------------------------
# Safety checker
# ---------------------------------------------------------------------------------------------------------------
def write_safety_checkers(out: Path, seed: int) -> dict[str, Path]:
    """DIR/tiny-safety-checker/{passes,flags}/: config.json, model.safetensors, preprocessor_config.json."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    config = CLIPConfig(text_config=SAFETY_TEXT, vision_config=SAFETY_VISION, projection_dim=SAFETY_PROJECTION_DIM)
    processor = CLIPImageProcessor(  # the real one's settings, at the tiny image size
        size={"shortest_edge": SAFETY_VISION["image_size"]},
        crop_size={"height": SAFETY_VISION["image_size"], "width": SAFETY_VISION["image_size"]},
    )
    seeded(seed, "safety_checker")
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # the constructor leaves the concept embeddings at ones: make them distinct
        checker.concept_embeds.copy_(torch.randn(checker.concept_embeds.shape))
        checker.special_care_embeds.copy_(torch.randn(checker.special_care_embeds.shape))
    paths = {}
    for variant, threshold in SAFETY_THRESHOLDS.items():
        folder = out / "tiny-safety-checker" / variant
        shutil.rmtree(folder, ignore_errors=True)
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(threshold)
            checker.special_care_embeds_weights.fill_(threshold)
        checker.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        paths[f"safety-checker-{variant}"] = folder
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def write_config_folder(diffusers_dir: Path, config_dir: Path) -> None:
    """Copy everything but the weights: what from_single_file(config=...) needs instead of the hub."""
    for source in sorted(diffusers_dir.rglob("*")):
        if source.is_file() and not source.name.endswith(WEIGHT_SUFFIXES):
            target = config_dir / source.relative_to(diffusers_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def build_arch(arch: str, out: Path, seed: int) -> dict[str, Path]:
    root = out / f"tiny-{arch}"
    diffusers_dir, config_dir = root / "diffusers", root / "config"
    for stale in (diffusers_dir, config_dir):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = Path(scratch)
        write_tokenizer(tokenizers / "tokenizer", pad_token=EOS)
        if arch == "sdxl":
            write_tokenizer(tokenizers / "tokenizer_2", pad_token="!")  # real SDXL pads its second prompt with "!"
        pipe = build_pipeline(arch, seed, tokenizers)
        pipe.save_pretrained(diffusers_dir, safe_serialization=True)
        # Keep the hand-written tokenizer files (real SD repos ship vocab.json + merges.txt, not tokenizer.json).
        for name in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
            shutil.rmtree(diffusers_dir / name)
            shutil.copytree(tokenizers / name, diffusers_dir / name)
    write_config_folder(diffusers_dir, config_dir)
    checkpoint = root / f"tiny-{arch}.safetensors"
    save_file(original_checkpoint(pipe, arch), checkpoint, metadata={"format": "pt"})
    paths = {f"tiny-{arch}": root}
    paths.update(write_loras(pipe, arch, out / "loras", seed))
    from devtools.tiny_controlnet_union import write_tiny_controlnet_union
    from devtools.tiny_inpaint import write_tiny_inpaint  # its own module, which imports this one
    from devtools.tiny_vae import write_tiny_vaes  # its own module, which imports this one

    paths.update(write_tiny_vaes(arch, out / "vaes", seed))
    paths.update(write_embeddings(pipe, arch, out / "embeddings", seed))
    if arch == "sd15":
        paths.update(write_tiny_inpaint(out, seed))  # devtools/tiny_inpaint.py: a 9-channel UNet on this model
    if arch == "sdxl":
        paths.update(build_refiners(out, seed))  # devtools/tiny_refiner.py: reuses this model's VAE, text_encoder_2
        paths.update(write_tiny_controlnet_union(pipe.unet, out, seed))  # devtools/tiny_controlnet_union.py
    paths.update(write_tiny_controlnets(pipe.unet, arch, out, seed))
    paths.update(write_tiny_ip_adapter(pipe, arch, out, seed))
    return paths


def build_tiny_models(out: Path, archs=ARCHS, seed: int = 0) -> dict[str, Path]:
    """Build the tiny models of ``archs`` (and the tiny safety checkers) under ``out``; return {"tiny-sd15":
    DIR/tiny-sd15, "lora-sd15-peft": ..., "safety-checker-passes": ...}."""
    unknown = set(archs) - set(ARCHS)
    if unknown:
        raise ValueError(f"archs: unknown {sorted(unknown)}; valid: {list(ARCHS)}")
    from devtools.tiny_flux import write_tiny_flux  # (it imports this module's tokenizer helpers)
    from devtools.tiny_flux_dev import write_tiny_flux_dev

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    from devtools.tiny_sd3 import write_tiny_sd3  # its own module, which imports this one

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        for arch in archs:
            paths.update(build_arch(arch, out, seed))
        paths.update(write_safety_checkers(out, seed))
        paths.update(write_tiny_upscalers(out, seed))
        paths.update(write_tiny_flux(out, seed))
        paths.update(write_tiny_flux_dev(out))
        paths.update(write_tiny_preprocessors(out, seed))
        paths.update(write_tiny_depth(out, seed))  # devtools/tiny_depth.py: Depth Anything
        paths.update(write_tiny_lineart_anime(out, seed))  # devtools/tiny_lineart_anime.py
        paths.update(write_tiny_sd3(out, seed))  # devtools/tiny_sd3.py: the tiny SD3 model and its LoRA
    # safetensors writes 0600 files; weights are meant to be shared (a non-root container reading a mounted bucket).
    for path in out.rglob("*.safetensors"):
        path.chmod(0o644)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("bucket"), help="output folder (default: ./bucket)")
    parser.add_argument(
        "--arch", action="append", choices=ARCHS, help="architecture to build (repeatable; default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0); same seed, same bytes")
    args = parser.parse_args(argv)
    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()
    started = time.perf_counter()
    paths = build_tiny_models(args.out, archs=tuple(args.arch or ARCHS), seed=args.seed)
    for name, path in paths.items():
        print(f"{name:18} {path}")
    print(f"built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
