"""A tiny random-weight Stable Diffusion 3 model (MMDiT transformer, CLIP-L + CLIP-G + T5, 16-channel VAE), offline.

Under ``DIR/tiny-sd3/diffusers/``: a complete diffusers folder of ``StableDiffusion3Pipeline`` (the real layout:
transformer, text_encoder/_2/_3, tokenizer/_2/_3, vae, scheduler), and ``DIR/loras/tiny-sd3-peft.safetensors``: a
rank-4 LoRA on the transformer's attention, as diffusers' ``save_lora_weights`` writes it (and
``DIR/controlnets/tiny-sd3-control/``: devtools/tiny_sd3_controlnet.py). The T5 tokenizer is a
SentencePiece Unigram over a vocabulary made up here (no hub). Called by devtools/tiny_models.py's
``build_tiny_models``; the same seed gives byte-identical files.

``DIR/tiny-sd3/tiny-sd3.safetensors`` is the same model as one file in the SAI/ComfyUI layout (MMDiT under
``model.diffusion_model.``, ``text_encoders.clip_l/clip_g/t5xxl.transformer.``, VAE under ``first_stage_model.``), and
``DIR/tiny-sd3/config/`` the weight-less folder ``from_single_file(..., config=...)`` reads (diffusers infers an SD3
file's configs from the real widths only, so the tiny one always needs it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from devtools.tiny_models import (
    EOS,
    LORA_RANK,
    TOKENIZER_WORDS,
    VAE,
    clip_to_original,
    text_encoder_config,
    tokenizer_vocab_and_merges,
    vae_to_original,
    write_config_folder,
    write_tokenizer,
)

SEED_BASE = 40  # seed offsets of this model's components: not those of tiny-sd15 / tiny-sdxl
# Widths: CLIP-L 768, CLIP-G 1280 (diffusers' single-file loader tells the two apart by width, so they differ here
# too); CLIP-L's projection is the identity, as diffusers loads it from a single file. T5-XXL: 4096 wide, at least
# CLIP-L + CLIP-G (SD3 pads their concatenated hidden states to T5's width).
CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
CLIP_G = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
T5 = dict(d_model=96, d_ff=96, d_kv=16, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
TRANSFORMER = dict(  # SD3 medium: patch 2, 16 channels, 24 layers of 24 x 64 heads, joint 4096, pooled 2048
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5["d_model"],
    pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"], pos_embed_max_size=32,
)
# SD3's VAE: 16 latent channels, no quant convs, its scaling and shift factors
SD3_VAE = dict(VAE, in_channels=3, out_channels=3, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece Unigram) over a made-up vocabulary: <pad> 0, </s> 1, <unk> 2, then the tiny
    vocabulary's words as whole pieces and single characters to spell the rest; every text ends with </s>."""
    pieces = [("\u2581" + word, -1.0) for word in TOKENIZER_WORDS]
    pieces += [(char, -5.0) for char in "\u2581abcdefghijklmnopqrstuvwxyz0123456789,.:()"]
    vocab = [(token, 0.0) for token in T5_SPECIAL] + list(dict(pieces).items())
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_pipeline(seed: int, scratch: Path) -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline with fresh random weights."""
    vocab, _ = tokenizer_vocab_and_merges()
    write_tokenizer(scratch / "tokenizer", pad_token=EOS)
    write_tokenizer(scratch / "tokenizer_2", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(scratch / "tokenizer", local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(scratch / "tokenizer_2", local_files_only=True)
    torch.manual_seed(seed * 100 + SEED_BASE + 1)
    text_encoder = CLIPTextModelWithProjection(text_encoder_config(CLIP_L, vocab, EOS, "quick_gelu"))
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(CLIP_L["hidden_size"]))
    torch.manual_seed(seed * 100 + SEED_BASE + 2)
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(CLIP_G, vocab, "!", "gelu"))
    tokenizer_3 = t5_tokenizer()
    torch.manual_seed(seed * 100 + SEED_BASE + 3)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), pad_token_id=0, eos_token_id=1,
                                             decoder_start_token_id=0, feed_forward_proj="gated-gelu", **T5))
    torch.manual_seed(seed * 100 + SEED_BASE + 4)
    transformer = SD3Transformer2DModel(**TRANSFORMER)
    torch.manual_seed(seed * 100 + SEED_BASE + 5)
    vae = AutoencoderKL(**SD3_VAE)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def transformer_to_original(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel -> the SAI MMDiT layout (fused qkv; the inverse of diffusers'
    ``convert_sd3_transformer_checkpoint_to_diffusers``; its scale/shift swap is its own inverse)."""

    def swapped(tensor):
        shift, scale = tensor.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)

    renames = {
        "pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    }
    out = {}
    for old, new in renames.items():
        for key in [k for k in state if k == old or k.startswith(old + ".")]:
            out[new + key[len(old):]] = state[key]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swapped(state[f"norm_out.linear.{kind}"])
    for i in range(layers):
        block, joint, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", i == layers - 1
        for kind in ("weight", "bias"):
            out[f"{joint}x_block.attn.qkv.{kind}"] = torch.cat([state[f"{block}attn.to_{p}.{kind}"] for p in "qkv"])
            out[f"{joint}context_block.attn.qkv.{kind}"] = torch.cat(
                [state[f"{block}attn.add_{p}_proj.{kind}"] for p in "qkv"])
            pairs = {"attn.to_out.0": "x_block.attn.proj", "norm1.linear": "x_block.adaLN_modulation.1",
                     "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
            if not last:
                pairs.update({"attn.to_add_out": "context_block.attn.proj",
                              "norm1_context.linear": "context_block.adaLN_modulation.1",
                              "ff_context.net.0.proj": "context_block.mlp.fc1",
                              "ff_context.net.2": "context_block.mlp.fc2"})
            for old, new in pairs.items():
                out[f"{joint}{new}.{kind}"] = state[f"{block}{old}.{kind}"]
            if last:
                out[f"{joint}context_block.adaLN_modulation.1.{kind}"] = swapped(
                    state[f"{block}norm1_context.linear.{kind}"])
    return {"model.diffusion_model." + key: value for key, value in out.items()}


def original_checkpoint(pipe: StableDiffusion3Pipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights as one SD3 single file (SAI / ComfyUI layout)."""
    checkpoint = transformer_to_original(pipe.transformer.state_dict(), pipe.transformer.config.num_layers)
    checkpoint.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    for name, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        state = encoder.state_dict()  # the projection sits beside text_model, as in SAI's files
        projection = {f"text_encoders.{name}.transformer.text_projection.weight": state.pop("text_projection.weight")}
        checkpoint.update(clip_to_original(state, f"text_encoders.{name}.transformer.") | projection)
    checkpoint.update({f"text_encoders.t5xxl.transformer.{key}": value
                       for key, value in pipe.text_encoder_3.state_dict().items()})
    return {key: value.detach().to(torch.float32).contiguous().clone() for key, value in checkpoint.items()}


def write_lora(pipe: StableDiffusion3Pipeline, directory: Path, seed: int) -> Path:
    """A rank-4 transformer LoRA with random (non-zero) A and B, saved as diffusers' save_lora_weights writes it.
    Adds the adapter to ``pipe.transformer``: call last."""
    generator = torch.Generator().manual_seed(seed * 100 + SEED_BASE + 6)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS,
                                       init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in sorted(transformer.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
    layers = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    directory.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=layers,
                                               weight_name="tiny-sd3-peft.safetensors")
    return directory / "tiny-sd3-peft.safetensors"


def write_tiny_sd3(out: Path, seed: int) -> dict[str, Path]:
    """Write DIR/tiny-sd3/diffusers/ and DIR/loras/tiny-sd3-peft.safetensors; return their paths."""
    root = out / "tiny-sd3"
    shutil.rmtree(root, ignore_errors=True)
    scratch = out / ".tiny-sd3-tokenizers"
    try:
        pipe = build_pipeline(seed, scratch)
        pipe.save_pretrained(root / "diffusers", safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):  # the hand-written CLIP files, as real repos ship them
            shutil.rmtree(root / "diffusers" / name)
            shutil.copytree(scratch / name, root / "diffusers" / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_config_folder(root / "diffusers", root / "config")
    save_file(original_checkpoint(pipe), root / "tiny-sd3.safetensors", metadata={"format": "pt"})
    from devtools.tiny_sd3_controlnet import write_tiny_sd3_controlnet

    controlnet = write_tiny_sd3_controlnet(pipe.transformer, out, seed)  # devtools/tiny_sd3_controlnet.py
    return {"tiny-sd3": root, "lora-sd3-peft": write_lora(pipe, out / "loras", seed), **controlnet}
