"""A tiny random-weight FLUX.1 model (transformer, CLIP + T5 text encoders, 16x VAE) and tiny FLUX LoRAs, offline.

Layout written under ``DIR`` (called by devtools/tiny_models.py's ``build_tiny_models``):

    DIR/tiny-flux/diffusers/               complete diffusers FluxPipeline folder (safetensors weights)
    DIR/tiny-flux/tiny-flux-transformer.safetensors  its transformer alone, one file (diffusers' keys: see below)
    DIR/tiny-flux/base/                    the folder without the transformer's weights (a single file's config_uri)
    DIR/loras/tiny-flux-peft.safetensors   rank-4 LoRA on the transformer, diffusers/peft keys (``transformer.*``)
    DIR/loras/tiny-flux-kohya.safetensors  the same matrices in kohya's sd-scripts layout (``lora_unet_*``, alpha 4)
    DIR/loras/tiny-flux-xlabs.safetensors  a LoRA in XLabs' layout (``double_blocks.N.processor.*_lora*``)

The transformer has the real block types (one double-stream block, one single-stream block) and guidance embedding
(FLUX.1-dev style: ``guidance_scale`` changes the image); the scheduler config is FLUX.1-schnell's. The CLIP
tokenizer is the tiny one of devtools/tiny_models.py; the T5 tokenizer is a tiny Unigram vocabulary built on the
spot (no sentencepiece file, no hub). The same seed gives byte-identical files.

The single file has diffusers' key names, not BFL's: diffusers' BFL converter
(``convert_flux_transformer_checkpoint_to_diffusers``) hard-codes FLUX.1's width (3072) and cannot map a tiny one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from devtools.tiny_models import EOS, TOKENIZER_WORDS, text_encoder_config, tokenizer_vocab_and_merges, write_tokenizer

SEED_OFFSETS = {"text_encoder": 81, "text_encoder_2": 82, "transformer": 83, "vae": 84, "lora": 85}
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)  # 768/3072/12/12
T5_TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)  # T5-XXL: 4096/64/10240/24/64
T5_MAX_TOKENS = 512
LATENT_CHANNELS = 4  # 16; the transformer sees 2x2 patches of them: in_channels = 4 * latent channels
TRANSFORMER = dict(  # FLUX.1: 19 double + 38 single blocks, 24 heads of 128, joint 4096, pooled 768, rope (16, 56, 56)
    patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=T5_TEXT["d_model"], pooled_projection_dim=CLIP_TEXT["hidden_size"],
    guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
VAE = dict(  # 4 levels = 8x downscale as the real one; FLUX's VAE has no quant convs and a shift factor
    in_channels=3, out_channels=3, block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
    sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)
SCHNELL_SCHEDULER = dict(  # black-forest-labs/FLUX.1-schnell's scheduler_config.json
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
LORA_RANK = 4


def write_t5_tokenizer(directory: Path) -> None:
    """A tiny T5 tokenizer (Unigram over the tiny CLIP words and single characters), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += [f"\u2581{word}" for word in TOKENIZER_WORDS] + [chr(c) for c in range(33, 127)] + ["\u2581"]
    vocab = [(piece, 0.0 if i < 3 else -float(len(pieces) - i) / len(pieces)) for i, piece in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=T5_MAX_TOKENS)
    fast.save_pretrained(directory)


def build_flux_pipeline(seed: int, scratch: Path) -> FluxPipeline:
    """A FluxPipeline with fresh random weights."""
    write_tokenizer(scratch / "tokenizer", pad_token=EOS)
    write_t5_tokenizer(scratch / "tokenizer_2")
    vocab, _ = tokenizer_vocab_and_merges()
    torch.manual_seed(seed * 100 + SEED_OFFSETS["text_encoder"])
    text_encoder = CLIPTextModel(text_encoder_config(CLIP_TEXT, vocab, EOS, "quick_gelu"))
    tokenizer_2 = T5TokenizerFast.from_pretrained(scratch / "tokenizer_2", local_files_only=True)
    torch.manual_seed(seed * 100 + SEED_OFFSETS["text_encoder_2"])
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), decoder_start_token_id=0, pad_token_id=0,
                                             eos_token_id=1, relative_attention_num_buckets=8,
                                             feed_forward_proj="gated-gelu", **T5_TEXT))
    torch.manual_seed(seed * 100 + SEED_OFFSETS["transformer"])
    transformer = FluxTransformer2DModel(**TRANSFORMER)
    torch.manual_seed(seed * 100 + SEED_OFFSETS["vae"])
    vae = AutoencoderKL(**VAE)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(scratch / "tokenizer", local_files_only=True),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def _pair(generator: torch.Generator, rows: int, columns: int, rank: int = LORA_RANK) -> tuple:
    """(down, up) LoRA matrices, large enough to change a tiny model's image visibly."""
    down = torch.randn(rank, columns, generator=generator) * 0.3
    up = torch.randn(rows, rank, generator=generator) * 0.3
    return down, up


def write_flux_loras(transformer: FluxTransformer2DModel, out: Path, seed: int) -> dict[str, Path]:
    """Three LoRAs on the tiny transformer, one per layout diffusers' FluxLoraLoaderMixin converts."""
    generator = torch.Generator().manual_seed(seed * 100 + SEED_OFFSETS["lora"])
    inner = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    out.mkdir(parents=True, exist_ok=True)
    # diffusers/peft layout (what FluxPipeline.save_lora_weights writes) and the same matrices in kohya's layout
    peft, kohya = {}, {}
    targets = {  # diffusers module -> kohya module (the original BFL layout's names)
        "transformer_blocks.0.attn.to_out.0": "lora_unet_double_blocks_0_img_attn_proj",
        "transformer_blocks.0.attn.to_add_out": "lora_unet_double_blocks_0_txt_attn_proj",
        "single_transformer_blocks.0.proj_out": "lora_unet_single_blocks_0_linear2",
    }
    modules = dict(transformer.named_modules())
    for target, kohya_name in targets.items():
        layer = modules[target]
        down, up = _pair(generator, layer.out_features, layer.in_features)
        peft[f"transformer.{target}.lora_A.weight"] = down
        peft[f"transformer.{target}.lora_B.weight"] = up
        kohya[f"{kohya_name}.lora_down.weight"] = down
        kohya[f"{kohya_name}.lora_up.weight"] = up
        kohya[f"{kohya_name}.alpha"] = torch.tensor(float(LORA_RANK))  # alpha = rank: scale 1, as the peft file
    # XLabs: attention processors' LoRAs of the double blocks (qkv split into q, k, v by the converter)
    xlabs = {}
    for name, rows in (("qkv_lora1", 3 * inner), ("proj_lora1", inner)):
        down, up = _pair(generator, rows, inner)
        xlabs[f"double_blocks.0.processor.{name}.down.weight"] = down
        xlabs[f"double_blocks.0.processor.{name}.up.weight"] = up
    paths = {}
    for layout, state in (("peft", peft), ("kohya", kohya), ("xlabs", xlabs)):
        path = out / f"tiny-flux-{layout}.safetensors"
        save_file({key: value.contiguous() for key, value in state.items()}, path, metadata={"format": "pt"})
        paths[f"lora-flux-{layout}"] = path
    return paths


def save_flux_folder(pipe, folder: Path, tokenizer: Path) -> None:
    """Save ``pipe`` as a diffusers folder (safetensors) with the hand-written CLIP tokenizer files of ``tokenizer``
    (vocab + merges, as the real repos ship them) in place of what save_pretrained writes."""
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tokenizer, folder / "tokenizer")


def write_tiny_flux(out: Path, seed: int) -> dict[str, Path]:
    """Write tiny-flux (diffusers folder) and its LoRAs under ``out``; return their paths."""
    root = out / "tiny-flux"
    folder = root / "diffusers"
    shutil.rmtree(root, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_flux_pipeline(seed, Path(scratch))
        save_flux_folder(pipe, folder, Path(scratch) / "tokenizer")
    shutil.copytree(folder, root / "base")
    for weights in (root / "base" / "transformer").glob("*.safetensors*"):  # its config.json stays
        weights.unlink()
    state = {key: value.contiguous() for key, value in pipe.transformer.state_dict().items()}
    save_file(state, root / "tiny-flux-transformer.safetensors", metadata={"format": "pt"})
    paths = {"tiny-flux": root}
    paths.update(write_flux_loras(pipe.transformer, out / "loras", seed))
    from devtools.tiny_flux_fill import write_tiny_flux_fill  # its own module, which imports this one

    paths.update(write_tiny_flux_fill(out, seed, pipe, folder / "tokenizer"))
    return paths
