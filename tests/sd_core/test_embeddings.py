"""Textual-inversion embeddings through the sd_core API on the tiny models: names in (negative) prompts as A1111
finds them, equal to bare diffusers' load_textual_inversion, no trace on requests that do not name them, SDXL files,
LRU eviction, refused files and URLs, the infotext's `TI hashes` and the A1111 listing."""

import dataclasses
import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sd_core import a1111_listing
from sd_core.embeddings import TOKEN_PREFIX, find_names
from sd_core.errors import InvalidRequest, ModelNotFound
from sd_core.manifests import EmbeddingEntry, ModelCatalog
from sd_core.outputs import infotext_parameters
from sd_core.schema import GenerationRequest

FAST = {"prompt": "a red fox in the snow", "seed": 3, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64,
        "height": 64, "scheduler": "Euler"}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    return engine.generate(GenerationRequest(**{**FAST, **fields}))


@pytest.fixture(scope="module")
def extra_files(tiny_bucket, tmp_path_factory) -> dict[str, str]:
    """Another SD1.5 embedding (3 vectors, A1111's string_to_param layout), pickles, and a file without tensors."""
    folder = tmp_path_factory.mktemp("extra-embeddings")
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5)) * 0.1
    save_file({"string_to_param.*": vectors}, folder / "other.safetensors")
    torch.save({"string_to_param": {"*": vectors}}, folder / "pickled.pt")
    torch.save({"emb_params": vectors}, folder / "pickled-in-disguise.safetensors")
    save_file({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, folder / "two-tensors.safetensors")
    first, _second = load_file(tiny_bucket / "embeddings" / "tiny-sd15-neg.safetensors")["emb_params"]
    save_file({"emb_params": torch.stack([first, -first])}, folder / "same-first-vector.safetensors")
    return {name: str(folder / name) for name in
            ("other.safetensors", "pickled.pt", "pickled-in-disguise.safetensors", "two-tensors.safetensors",
             "same-first-vector.safetensors")}


@pytest.fixture(scope="module")
def catalog(engine_settings, extra_files, tiny_bucket) -> ModelCatalog:
    """The repo manifests plus test-only embeddings (absolute paths, as an operator's manifest may hold)."""
    catalog = ModelCatalog.from_dir(engine_settings.models_dir)
    extra = [EmbeddingEntry(name="other-neg", uri=extra_files["other.safetensors"]),
             EmbeddingEntry(name="pickled", uri=extra_files["pickled.pt"]),
             EmbeddingEntry(name="disguised", uri=extra_files["pickled-in-disguise.safetensors"]),
             EmbeddingEntry(name="two-tensors", uri=extra_files["two-tensors.safetensors"]),
             EmbeddingEntry(name="same-first", uri=extra_files["same-first-vector.safetensors"]),
             EmbeddingEntry(name="xl-file", uri=str(tiny_bucket / "embeddings" / "tiny-sdxl-neg.safetensors"))]
    manifests = dict(catalog.manifests)
    manifests["tiny-sd15"] = manifests["tiny-sd15"].model_copy(
        update={"embeddings": [*manifests["tiny-sd15"].embeddings, *extra]})
    return ModelCatalog(manifests)


@pytest.fixture(scope="module")
def make(engine_settings, catalog):
    from sd_core.engine import Engine

    def make_engine(**changes):
        return Engine(dataclasses.replace(engine_settings, **changes), catalog=catalog)

    return make_engine


@pytest.fixture(scope="module")
def emb_engine(make):
    return make()


@pytest.fixture(scope="module")
def fresh_images(make) -> dict:
    """Images from an engine that never loaded an embedding (built first, used for nothing else)."""
    engine = make()
    return {(model, negative): pixels(generate(engine, model=model, negative_prompt=negative))
            for model in ("tiny-sd15", "tiny-sdxl") for negative in ("blurry", "blurry, tiny-negative")}


def bare_image(tiny_bucket, arch: str, negative: str, embedding: str | None) -> np.ndarray:
    """The same generation through bare diffusers: the A1111 file's vectors loaded with load_textual_inversion under
    a token of our choosing, written into the negative prompt."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny_bucket / f"tiny-{arch}" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    if embedding:
        state = load_file(tiny_bucket / "embeddings" / f"tiny-{arch}-neg.safetensors")
        if arch == "sdxl":
            pipe.load_textual_inversion(state["clip_l"], token="neg_emb", tokenizer=pipe.tokenizer,
                                        text_encoder=pipe.text_encoder)
            pipe.load_textual_inversion(state["clip_g"], token="neg_emb", tokenizer=pipe.tokenizer_2,
                                        text_encoder=pipe.text_encoder_2)
        else:
            pipe.load_textual_inversion(state["emb_params"], token="neg_emb")
    with torch.inference_mode():
        image = pipe(prompt=FAST["prompt"], negative_prompt=negative, num_inference_steps=2, guidance_scale=7.0,
                     width=64, height=64, output_type="pil", generator=torch.Generator("cpu").manual_seed(3)).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float32)


# --- what embeddings do to images -------------------------------------------------------------------------------
@pytest.mark.parametrize("model,name", [("tiny-sd15", "tiny-neg"), ("tiny-sdxl", "tiny-xl-neg")])
def test_negative_embedding_changes_the_image_and_leaves_no_trace(emb_engine, fresh_images, tiny_bucket, model, name):
    arch = model.removeprefix("tiny-")
    negated = generate(emb_engine, model=model, negative_prompt=f"blurry, {name.upper()}")  # any case
    plain = generate(emb_engine, model=model, negative_prompt="blurry")  # after it was loaded
    substring = generate(emb_engine, model=model, negative_prompt="blurry, tiny-negative")  # not the name
    assert np.abs(pixels(negated) - pixels(plain)).mean() > 1.0
    # Exactly the images of an engine that never loaded the embedding.
    assert np.array_equal(pixels(plain), fresh_images[(model, "blurry")])
    assert np.array_equal(pixels(substring), fresh_images[(model, "blurry, tiny-negative")])
    assert emb_engine.embeddings.loaded(emb_engine.pool.get(model))  # ... while it stays loaded
    # Equivalence: bare diffusers with load_textual_inversion and the token in the negative prompt.
    assert np.array_equal(pixels(negated), bare_image(tiny_bucket, arch, "blurry, neg_emb", name))
    # Found inside A1111's attention syntax too, and weighted there (sd_core/prompt_encoding.py).
    weighted = generate(emb_engine, model=model, negative_prompt=f"blurry, ({name}:1.2)")
    assert np.abs(pixels(weighted) - pixels(negated)).mean() > 0.1
    assert np.abs(pixels(weighted) - pixels(plain)).mean() > 1.0
    assert np.array_equal(pixels(plain), bare_image(tiny_bucket, arch, "blurry", None))
    # Infotext and the effective request: the user's words, and A1111's `TI hashes` (12 hex digits of the file).
    digest = hashlib.sha256((tiny_bucket / "embeddings" / f"tiny-{arch}-neg.safetensors").read_bytes()).hexdigest()
    assert f"\nNegative prompt: blurry, {name.upper()}\n" in negated.parameters
    assert infotext_parameters(negated.parameters)["TI hashes"] == f"{name}: {digest[:12]}"
    assert "TI hashes" not in plain.parameters
    assert negated.request.negative_prompt == f"blurry, {name.upper()}"


def test_names_are_found_where_a1111_finds_them():
    pattern = find_names(("bad", "EasyNegative", "EasyNegativeV2"))
    assert [pattern.findall(text) for text in ("a badger", "xbad", "bad, dog", "[bad]", "(easynegative:1.2)",
                                               "EasyNegativeV2", "EasyNegative2", "bad_hands")] == [
        [], [], ["bad"], ["bad"], ["easynegative"], ["EasyNegativeV2"], ["EasyNegative"], ["bad"]]


def test_embedding_in_the_prompt_and_by_request_field(emb_engine):
    in_prompt = generate(emb_engine, prompt="a red fox in the snow, tiny-neg")
    assert np.abs(pixels(in_prompt) - pixels(generate(emb_engine))).mean() > 1.0
    # The request's own name for a manifest embedding: the same token, the same image.
    aliased = generate(emb_engine, prompt="a red fox in the snow, myneg",
                       embeddings=[{"name": "myneg", "source": "tiny-neg"}])
    assert np.array_equal(pixels(aliased), pixels(in_prompt))
    assert infotext_parameters(aliased.parameters)["TI hashes"].startswith("myneg: ")


def test_every_vector_counts_with_clip_skip_too(emb_engine):
    # Same first vector, different second one: the images differ only if both vectors reach the text encoder (clip
    # skip encodes the prompts itself: the multi-vector token must be expanded there as in diffusers' encode_prompt).
    for skip in (0, 1):
        one, other = (generate(emb_engine, negative_prompt=name, clip_skip=skip) for name in ("tiny-neg", "same-first"))
        assert np.abs(pixels(one) - pixels(other)).mean() > 0.5, skip


def test_lru_eviction_unloads_and_reloads(make, emb_engine):
    engine = make(max_embeddings=1)
    first = generate(engine, negative_prompt="tiny-neg")
    generate(engine, negative_prompt="other-neg")
    model = engine.pool.get("tiny-sd15")
    assert engine.embeddings.loaded(model) == [TOKEN_PREFIX + engine_sha(engine, "other-neg")[:16]]
    tokenizer = model.pipeline("txt2img").tokenizer
    assert not any(token.startswith(TOKEN_PREFIX) and not token.startswith(engine.embeddings.loaded(model)[0])
                   for token in tokenizer.get_vocab())
    again = generate(engine, negative_prompt="tiny-neg")
    assert np.array_equal(pixels(again), pixels(first))
    assert np.array_equal(pixels(first), pixels(generate(emb_engine, negative_prompt="tiny-neg")))


def engine_sha(engine, name: str) -> str:
    entry = engine.catalog.embeddings_for(engine.catalog.get("tiny-sd15"))[name]
    return hashlib.sha256(open(entry.uri, "rb").read()).hexdigest()


def test_jobs_with_different_embeddings_share_a_batch(emb_engine):
    requests = [GenerationRequest(**FAST, negative_prompt="tiny-neg"), GenerationRequest(**FAST, negative_prompt="x"),
                GenerationRequest(**FAST, negative_prompt="other-neg")]
    jobs = [emb_engine.prepare(request) for request in requests]
    assert len({job.batch_key for job in jobs}) == 1
    batched = emb_engine.denoiser.run(jobs)
    for request, images in zip(requests, batched, strict=True):
        alone = pixels(emb_engine.generate(request))
        assert np.abs(np.asarray(images[0].convert("RGB"), dtype=np.float32) - alone).max() <= 2


# --- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,message", [
    ("pickled", "^embeddings: pickled: not a .safetensors file; pickle embeddings"),
    ("disguised", "^embeddings: disguised: not a .safetensors file; pickle embeddings"),
    ("two-tensors", "^embeddings: two-tensors: not a textual-inversion embedding"),
    ("xl-file", "^embeddings: xl-file: is an embedding for SDXL"),
])
def test_unusable_files_are_refused(emb_engine, name, message):
    with pytest.raises(InvalidRequest, match=message):
        generate(emb_engine, negative_prompt=f"blurry, {name}")
    assert generate(emb_engine, negative_prompt="blurry").images  # the model is unharmed


def test_pickle_embedding_loads_when_pickle_is_allowed(make):
    engine = make(allow_pickle=True)
    from_pickle = generate(engine, negative_prompt="pickled")
    assert np.array_equal(pixels(from_pickle), pixels(generate(engine, negative_prompt="other-neg")))


@pytest.fixture(scope="module")
def s3_emb_engine(make):
    return make(user_s3_buckets=("some-bucket",))


@pytest.mark.parametrize("source,field,message", [
    ("https://127.0.0.1/neg.safetensors", "embeddings.0.source", "127.0.0.1"),
    ("file:///etc/passwd", "embeddings.0.source", ""),
    ("s3://some-bucket/neg.pt", "embeddings", "pickle embeddings"),  # refused before any download
    ("s3://other-bucket/neg.safetensors", "embeddings.0.source", "SD_USER_S3_BUCKETS"),  # not on the allow-list
])
def test_request_urls_go_through_the_url_policy(s3_emb_engine, source, field, message):
    with pytest.raises(InvalidRequest) as caught:
        generate(s3_emb_engine, negative_prompt="neg", embeddings=[{"name": "neg", "source": source}])
    assert str(caught.value).startswith(f"{field}: ") and message in str(caught.value)


def test_unknown_names_and_the_reserved_prefix_are_refused(emb_engine):
    with pytest.raises(ModelNotFound, match="^embeddings.0.source: unknown embedding 'nope'"):
        generate(emb_engine, embeddings=[{"name": "neg", "source": "nope"}])
    with pytest.raises(InvalidRequest, match="^negative_prompt: 'sdemb_' is reserved"):
        generate(emb_engine, negative_prompt="SDEMB_0123")
    with pytest.raises(InvalidRequest, match="^prompt: 'sdemb_' is reserved"):
        generate(emb_engine, prompt="a sdemb_x")


# --- listing ----------------------------------------------------------------------------------------------------
def test_a1111_listing_shows_the_manifest_embeddings(emb_engine):
    listed = a1111_listing.answer("embeddings", {}, emb_engine)
    assert listed["skipped"] == {}
    none = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert listed["loaded"]["tiny-neg"] == {**none, "shape": 32, "vectors": 2}
    assert listed["loaded"]["tiny-xl-neg"] == {**none, "shape": 96, "vectors": 2}  # clip_l + clip_g, as A1111
    assert listed["loaded"]["other-neg"] == {**none, "shape": 32, "vectors": 3}  # from the file's header
