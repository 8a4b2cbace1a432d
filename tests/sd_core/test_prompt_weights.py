"""A1111 prompt syntax through the Engine on the tiny SD1.5 and SDXL models: weights, long prompts in 75-token chunks,
BREAK, prompt editing / alternation, batching; weight 1 through the weighted path equals the plain prompt and bare
diffusers, pixel for pixel."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from devtools.tiny_models import TOKENIZER_WORDS
from sd_core.prompt_encoding import encode_prompt
from sd_core.schema import GenerationRequest

FAST = {"seed": 5, "num_inference_steps": 4, "guidance_scale": 7.0, "width": 64, "height": 64, "scheduler": "Euler"}
WORDS = [w for w in TOKENIZER_WORDS if w not in ("a", "an", "the")]  # single tokens of the tiny tokenizer
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(150))  # 150 tokens: two chunks


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def image(engine, prompt: str, arch: str = "sd15", **fields) -> np.ndarray:
    return pixels(engine.generate(GenerationRequest(**{**FAST, **fields}, prompt=prompt, model=f"tiny-{arch}")))


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).mean()) > 0.5


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    """Bare diffusers pipelines from the tiny models' folders (no sd_core involved)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipes = {}

    def get(arch: str):
        if arch not in pipes:
            cls = StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline
            pipe = cls.from_pretrained(tiny_bucket / f"tiny-{arch}" / "diffusers", local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
            pipes[arch] = pipe
        return pipes[arch]

    return get


def bare_image(pipe, prompt: str) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = pipe(prompt=prompt, num_inference_steps=4, guidance_scale=7.0, width=64, height=64,
                   generator=torch.Generator("cpu").manual_seed(5), output_type="pil").images[0]
    return np.asarray(out.convert("RGB"), dtype=np.float32)


def engine_pipe(engine, arch: str):
    return engine.pool.get(f"tiny-{arch}").pipeline("txt2img")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_weight_one_through_the_weighted_path_equals_plain_and_bare_diffusers(engine, bare, arch):
    weighted = image(engine, "(cat:1.0) dog", arch)  # syntax: the embeddings path
    plain = image(engine, "cat dog", arch)  # no syntax: the text to the pipeline, as before
    assert np.array_equal(weighted, plain)
    assert np.array_equal(weighted, bare_image(bare(arch), "cat dog"))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_one_chunk_encoding_is_exactly_diffusers_encode_prompt(engine, arch):
    import torch

    pipe = engine_pipe(engine, arch)
    ours = encode_prompt(pipe, "a red cat, (masterpiece:1.0)")
    with torch.inference_mode():
        theirs = pipe.encode_prompt(prompt="a red cat, masterpiece", device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)
    assert ours.embeds.shape == theirs[0].shape
    assert torch.equal(ours.embeds, theirs[0])
    if arch == "sdxl":
        assert torch.equal(ours.pooled, theirs[2])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_weights_change_the_image(engine, arch):
    plain = image(engine, "a cat on the street", arch)
    up = image(engine, "(a cat:1.8) on the street", arch)
    down = image(engine, "[a cat] on the street", arch)
    # (with weight 1 the same syntax gives the plain image exactly: see the first test)
    assert not np.array_equal(up, plain) and not np.array_equal(down, plain) and not np.array_equal(up, down)


def test_weights_scale_token_embeddings_and_restore_the_mean(engine):
    import torch

    pipe = engine_pipe(engine, "sd15")
    plain, weighted = encode_prompt(pipe, "cat dog").embeds, encode_prompt(pipe, "(cat:1.5) dog").embeds
    assert not torch.equal(plain, weighted)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-6)  # A1111's mean restore


def test_long_prompt_uses_every_token(engine):
    first_75 = " ".join(LONG.split()[:75])  # what the pipeline alone keeps of LONG (it truncates at 77 tokens)
    assert differs(image(engine, LONG), image(engine, first_75))
    pipe = engine_pipe(engine, "sd15")
    assert encode_prompt(pipe, LONG).embeds.shape[1] == 154


def test_comma_backtrack_moves_the_last_words_to_the_next_chunk(engine):
    from sd_core.prompt_attention import parse_attention
    from sd_core.prompt_encoding import chunk_tokens

    pipe = engine_pipe(engine, "sd15")
    words = WORDS * 2
    text = " ".join(words[:65]) + ", " + " ".join(words[65:70]) + " " + " ".join(words[70:80])
    chunks = chunk_tokens(pipe, pipe.tokenizer, parse_attention(text))
    assert [len(tokens) for tokens, _ in chunks] == [66, 15]  # cut after the comma (token 66), not at 75
    assert len(chunk_tokens(pipe, pipe.tokenizer, parse_attention(" ".join(words[:80])))[0][0]) == 75


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_break_starts_a_chunk(engine, arch):
    pipe = engine_pipe(engine, arch)
    one = encode_prompt(pipe, "a cat, a dog")
    two = encode_prompt(pipe, "a cat BREAK a dog")
    assert one.embeds.shape[1] == 77 and two.embeds.shape[1] == 154
    assert differs(image(engine, "a cat BREAK a dog", arch), image(engine, "a cat a dog", arch))


def test_sdxl_pooled_comes_from_the_first_chunk(engine):
    import torch

    pipe = engine_pipe(engine, "sdxl")
    pooled = encode_prompt(pipe, "a cat BREAK a dog").pooled
    assert pooled.shape == encode_prompt(pipe, "a cat").pooled.shape
    assert torch.equal(pooled, encode_prompt(pipe, "a cat").pooled)  # chunks are encoded one by one, as A1111
    assert not torch.equal(pooled, encode_prompt(pipe, "a dog").pooled)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_prompt_editing_switches_during_sampling(engine, arch):
    cat, dog = image(engine, "a cat", arch), image(engine, "a dog", arch)
    apart = distance(cat, dog)
    # 4 steps, when 1: `from` for steps 1-2 (A1111 counts the switch step in), `to` for steps 3-4. The tiny models'
    # images are set mostly by the first steps: close to `from`, yet not equal to it.
    cat_dog, dog_cat = image(engine, "a [cat:dog:1]", arch), image(engine, "a [dog:cat:1]", arch)
    assert 0 < distance(cat_dog, cat) < apart / 2 and 0 < distance(dog_cat, dog) < apart / 2
    assert np.array_equal(image(engine, "a [cat:dog:0]", arch), dog)  # when 0: `to` from the first step
    assert np.array_equal(image(engine, "a [cat:dog:4]", arch), cat)  # when = the last step: never switches
    assert np.array_equal(image(engine, "a [dog:2.0]", arch), image(engine, "a ", arch))  # 2.0 = 2 x the steps
    alternating = image(engine, "a [cat|dog]", arch)  # cat, cat, dog, cat
    # not a single switch: step 3 differs from `[cat:dog:2]` (cat, cat, cat, dog). (The last step, from A1111's
    # sigma_min to 0, barely moves the tiny SDXL's pixels, so `cat_dog` may equal it there.)
    assert 0 < distance(alternating, cat) < apart / 2
    assert not np.array_equal(alternating, image(engine, "a [cat:dog:2]", arch))
    assert arch == "sdxl" or not np.array_equal(alternating, cat_dog)


def test_negative_prompt_syntax_and_lengths(engine):
    plain = image(engine, "a cat", negative_prompt="blurry")
    weighted = image(engine, "a cat", negative_prompt="(blurry:1.4)")
    long_negative = image(engine, "a cat", negative_prompt=LONG)  # 2 chunks: the prompt is padded to match
    assert differs(plain, weighted) and differs(plain, long_negative)


@pytest.fixture(scope="module")
def batching_engine(engine_settings):
    from sd_core.engine import Engine

    return Engine(dataclasses.replace(engine_settings, max_batch_images=8, batch_wait_ms=500))


def test_weighted_batch_mates_equal_their_lone_images(batching_engine, engine):
    from tests.sd_core.test_batching import run_concurrently

    prompts = ["a (cat:1.3) dog", "a [dog] in the city", LONG, "(red:0.8) bird BREAK sky", "a cat dog"]
    requests = [GenerationRequest(**{**FAST, "seed": seed}, prompt=p) for seed, p in enumerate(prompts)]
    results = run_concurrently(batching_engine, requests)
    assert all(not isinstance(r, Exception) for r in results), results
    sizes = [r.timings["batch_size"] for r in results]
    assert sizes[0] > 1 and sizes[1] > 1, sizes  # the one-chunk weighted prompts ran together
    assert sizes[4] == 1  # the plain prompt takes the text path: never with embedding-path jobs
    for request, result in zip(requests, results, strict=True):
        assert np.abs(pixels(result) - pixels(engine.generate(request))).max() <= 2  # batch kernels only


def test_edited_prompts_are_not_batched(batching_engine):
    from tests.sd_core.test_batching import run_concurrently

    requests = [GenerationRequest(**{**FAST, "seed": seed}, prompt="a [cat:dog:0.5]") for seed in range(2)]
    results = run_concurrently(batching_engine, requests)
    assert [r.timings["batch_size"] for r in results] == [1, 1]


def test_infotext_keeps_the_prompt_as_given(engine):
    result = engine.generate(GenerationRequest(**FAST, prompt="a (cat:1.2) [dog:bird:0.5] BREAK sky"))
    assert result.parameters.split("\n")[0] == "a (cat:1.2) [dog:bird:0.5] BREAK sky"
    assert result.request.prompt == "a (cat:1.2) [dog:bird:0.5] BREAK sky"
