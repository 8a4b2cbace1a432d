"""A1111 `override_settings`: which of A1111's options are read, which change the image (default only), the rest."""

from __future__ import annotations

from .errors import quote

# Options that change the image and that this worker runs only at A1111's default value (any other value is refused:
# it would change the image, and the worker cannot do it). Values as A1111 1.10's settings store them.
IMAGE_OPTION_DEFAULTS: dict[str, tuple] = {
    "eta_noise_seed_delta": (0,), "eta_ddim": (0,), "eta_ancestral": (1,), "randn_source": ("CPU",),
    "s_churn": (0,), "s_tmin": (0,), "s_tmax": (0,), "s_noise": (1,), "s_min_uncond": (0,), "sigma_min": (0,),
    "sigma_max": (0,), "rho": (0,), "k_sched_type": ("Automatic",), "always_discard_next_to_last_sigma": (False,),
    "sgm_noise_multiplier": (False,), "uni_pc_variant": ("bh1",), "uni_pc_skip_type": ("time_uniform",),
    "uni_pc_order": (3,), "uni_pc_lower_order_final": (True,), "ddim_discretize": ("uniform",),
    "img2img_fix_steps": (False,), "initial_noise_multiplier": (1,), "img2img_color_correction": (False,),
    "img2img_background_color": ("#ffffff",), "inpainting_mask_weight": (1,), "comma_padding_backtrack": (20,),
    "use_old_emphasis_implementation": (False,), "emphasis": ("Original",), "enable_emphasis": (True,),
    "upcast_attn": (False,), "token_merging_ratio": (0,), "token_merging_ratio_img2img": (0,),
    "token_merging_ratio_hr": (0,), "sd_unet": ("Automatic", "None"), "use_old_karras_scheduler_sigmas": (False,),
    "no_dpmpp_sde_batch_determinism": (False,), "use_old_hires_fix_width_height": (False,),
    "hires_fix_use_firstpass_conds": (False,), "use_old_scheduling": (False,), "sd_noise_schedule": ("Default",),
    "skip_early_cond": (0,), "sdxl_crop_top": (0,), "sdxl_crop_left": (0,), "pad_cond_uncond": (False,),
    "pad_cond_uncond_v0": (False,), "sd_vae_decode_method": ("Full",), "sd_vae_encode_method": ("Full",),
    "extra_networks_default_multiplier": (1,), "sdxl_refiner_low_aesthetic_score": (2.5,),
    "sdxl_refiner_high_aesthetic_score": (6,), "fp8_storage": ("Disable",), "CLIP_stop_at_last_layers_sdxl": (1,),
    "lora_functional": (False,), "use_downcasted_alpha_bar": (False,), "refiner_switch_by_sample_steps": (False,),
}
# Every other option is about A1111's UI, saving, previews or its server: it cannot change the image here.


def check_image_options(overrides: dict, errors: list[str]) -> None:
    """Append an error for each image-changing option set to something other than A1111's default."""
    for key, defaults in IMAGE_OPTION_DEFAULTS.items():
        if key not in overrides:
            continue
        value = overrides[key]
        if not _is_default(value, defaults):
            allowed = " or ".join(quote(d) for d in defaults)
            errors.append(f"override_settings.{key}: only A1111's default ({allowed}) is supported by this worker "
                          f"(it changes the image), got {quote(value)}")


def _is_default(value, defaults: tuple) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) != isinstance(defaults[0], bool):  # True is not the number 1 here, nor 0 False
        return False
    return value in defaults
