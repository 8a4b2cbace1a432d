"""resize_mode "latent" (A1111's img2img resize mode 3): the init image encoded at its own size, its latent resized."""

from __future__ import annotations

from PIL import Image


def init_latents(pipe, image: Image.Image, width: int, height: int, generators: list) -> object:
    """The img2img pipeline's ``image`` for resize_mode latent: (one per generator, 4, height/8, width/8) latents.

    Encoded as diffusers' SD / SDXL img2img ``prepare_latents`` encodes a pixel image (its image processor, the
    VAE's latent sample drawn with each image's generator in turn, so the generators are left where the pipeline
    would leave them; SDXL: the VAE upcast when its config says so, latents_mean/std), then resized bilinearly to
    the output size as A1111 does (``interpolate``, default corners). diffusers takes a 4-channel ``image`` as
    latents and only noises it.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    vae = pipe.vae
    encoder = getattr(pipe, "text_encoder_2", None) or pipe.text_encoder
    dtype = encoder.dtype if encoder is not None else pipe.unet.dtype  # the prompt embeddings': `image` is cast to it
    xl = type(pipe).__name__.startswith("StableDiffusionXL")  # SDXL base and refiner: the XL prepare_latents
    upcast = xl and vae.config.force_upcast
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(image).to(device=pipe._execution_device, dtype=dtype)
        if upcast:
            pixels = pixels.float()
            vae.to(dtype=torch.float32)
        try:
            latents = torch.cat([retrieve_latents(vae.encode(pixels), generator=g) for g in generators])
        finally:
            if upcast:
                vae.to(dtype)
        latents = latents.to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if xl and mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents)
            latents = (latents - mean) * vae.config.scaling_factor / std
        else:
            latents = vae.config.scaling_factor * latents
        factor = pipe.vae_scale_factor
        return torch.nn.functional.interpolate(latents, size=(height // factor, width // factor), mode="bilinear")


def check_size(image: Image.Image, max_pixels: int) -> None:
    """The init image is encoded at its own size: refused beyond the worker's pixel budget."""
    from .errors import InvalidRequest

    if image.width * image.height > max_pixels:
        raise InvalidRequest(
            f"{image.width}x{image.height} = {image.width * image.height} pixels; resize_mode latent encodes the "
            f"init image at its own size, and this worker's budget is {max_pixels} pixels (SD_MAX_PIXELS); send a "
            "smaller image, or use resize, crop or fill", field="image")
