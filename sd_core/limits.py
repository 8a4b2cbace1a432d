"""The request's limits and choices: sizes, counts, scales and the names of its enumerated values."""

from .preprocessor_names import MODULES

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_IMAGE_PIXELS = 1536 * 1536  # width * height of one image
MAX_STEPS = 150
MAX_SIGMA = 1000.0  # a request's own sigmas (SD's k-diffusion noise levels reach about 15; flow models' 1)
MAX_GUIDANCE = 30.0
MAX_OUTPUTS = 8
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 10_000
MAX_LORAS = 8
MAX_LORA_SCALE = 5.0
MAX_EMBEDDINGS = 16  # textual-inversion embeddings a request may bring in `embeddings`
EMBEDDING_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # as manifest names: the word that triggers it
MAX_MODEL_NAME_CHARS = 200  # a manifest name; a `model` URL may be longer (MAX_MODEL_URL_CHARS)
MAX_MODEL_URL_CHARS = 2048
MAX_CONTROLNETS = 4  # ControlNet units of one request
MAX_CONTROL_SCALE = 2.0  # A1111's weight slider goes to 2
CONTROL_PREPROCESSORS = tuple(MODULES)  # every module name known (sd_core/preprocessor_names.py); a worker has some
CONTROL_MODES = ("balanced", "prompt", "control")
CONTROL_RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
# the passes of a hires fix a unit steers (the extension's hr_option); without a hires fix a unit always applies
CONTROL_HIRES_OPTIONS = ("both", "low_res_only", "high_res_only")
# Union ControlNet control types in diffusers' control_mode order (xinsir's ControlNet++, the extension's order)
UNION_CONTROL_TYPES = ("openpose", "depth", "softedge", "canny", "normal", "segment", "tile", "inpaint")
MAX_IP_ADAPTER_IMAGES = 4  # reference images of one request (one IP-Adapter model per request)
MAX_IP_ADAPTER_SCALE = 2.0
MAX_SEQUENCE_LENGTH = 512  # T5 prompt tokens (FLUX, SD3): diffusers allows at most 512
MAX_CLIP_SKIP = 11  # CLIP ViT-L has 12 layers: at least one stays (each model is checked against its own depth)
OUTPUT_FORMATS = ("png", "webp", "jpeg")
# Replicate's SDXL names (stability-ai/sdxl): no second pass; the refiner denoises the last steps of the base's
# schedule (ensemble of experts); the refiner runs img2img on the base's finished image (sd_core/refiner.py)
REFINE_MODES = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")
MAX_SCHEDULER_CHARS = 64  # longer than any sampler name or alias: refused unread
MAX_MESSAGE_PARTS = 10  # validation errors described in one message; the rest are counted
MAX_MASK_BLUR = 64  # std in pixels of the mask's Gaussian blur
MAX_CROP_PADDING = 1024  # only-masked inpainting: pixels around the mask's bounding box
MAX_OUTPAINT = 1024  # pixels added on one side
MAX_REASON_CHARS = 1500  # one reason's length: room for the lists of valid values we write ourselves
# inpainting_fill, in A1111's order (0-3): what the masked area of the init image holds before denoising.
INPAINT_FILLS = ("fill", "original", "latent_noise", "latent_nothing")
# resize_mode, in A1111's order (0-3): how an init image of another size is brought to width x height. "latent"
# (A1111's 3, "just resize (latent upscale)"): encoded at its own size (within SD_MAX_PIXELS), its latent resized.
RESIZE_MODES = ("resize", "crop", "fill", "latent")
