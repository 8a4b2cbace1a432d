"""LoRAs through the sd_core API on the tiny models: formats, scales, several at once, prompt tags, hot swap, fusing,
errors that leave the base model intact, and concurrent requests with different LoRA sets."""

import dataclasses
import hashlib
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sd_core.errors import Cancelled, InvalidRequest, ModelNotFound
from sd_core.manifests import LoraEntry, ModelCatalog
from sd_core.outputs import read_parameters
from sd_core.prompt_tags import parse_prompt_tags
from sd_core.schema import GenerationRequest, LoraSpec
from tests.fixtures import a1111_infotext as a1111


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    return engine.generate(GenerationRequest(**{"prompt": "a red fox in the snow", "seed": 3, **fields}))


def lora(source, scale=None, te=None) -> dict:
    spec = {"source": source}
    if scale is not None:
        spec["scale"] = scale
    if te is not None:
        spec["text_encoder_scale"] = te
    return spec


def mean_diff(a, b) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


# --- LoRA files and an engine whose manifests name them ---------------------------------------------------------
@pytest.fixture(scope="module")
def extra_loras(tiny_bucket, tmp_path_factory) -> dict[str, str]:
    """Variants of the tiny sd15 LoRA: another random one, one whose text-encoder part does not fit (the UNet part
    does), and a pickle file."""
    folder = tmp_path_factory.mktemp("extra-loras")
    peft = load_file(tiny_bucket / "loras" / "tiny-sd15-peft.safetensors")
    generator = torch.Generator().manual_seed(7)
    other = {k: torch.randn(v.shape, generator=generator) / v.shape[1] ** 0.5 for k, v in peft.items()}
    save_file(other, folder / "other.safetensors")
    broken = {k: (torch.zeros(v.shape[0], v.shape[1] // 2) if k.startswith("text_encoder") and ".lora_A." in k else v)
              for k, v in peft.items()}
    save_file(broken, folder / "broken-te.safetensors")
    torch.save(peft, folder / "pickled.ckpt")
    torch.save(peft, folder / "pickled-in-disguise.safetensors")
    return {name: str(folder / name) for name in
            ("other.safetensors", "broken-te.safetensors", "pickled.ckpt", "pickled-in-disguise.safetensors")}


@pytest.fixture(scope="module")
def lora_catalog(engine_settings, extra_loras, tiny_bucket) -> ModelCatalog:
    """The repo manifests plus test-only LoRA entries (absolute paths, as an operator's manifest may hold)."""
    catalog = ModelCatalog.from_dir(engine_settings.models_dir)
    extra = {
        "tiny-sd15": [LoraEntry(name="other-style", uri=extra_loras["other.safetensors"]),
                      LoraEntry(name="half-fit", uri=extra_loras["broken-te.safetensors"]),
                      LoraEntry(name="pickled", uri=extra_loras["pickled.ckpt"]),
                      LoraEntry(name="disguised", uri=extra_loras["pickled-in-disguise.safetensors"]),
                      LoraEntry(name="strong-default", uri="loras/tiny-sd15-peft.safetensors", scale=0.5)],
        # A misconfigured manifest: an SD1.5 LoRA listed for the SDXL model.
        "tiny-sdxl": [LoraEntry(name="wrong-arch", uri=str(tiny_bucket / "loras" / "tiny-sd15-peft.safetensors"))],
    }
    manifests = dict(catalog.manifests)
    for name, entries in extra.items():
        manifests[name] = manifests[name].model_copy(update={"loras": [*manifests[name].loras, *entries]})
    return ModelCatalog(manifests)


@pytest.fixture(scope="module")
def make_lora_engine(engine_settings, lora_catalog):
    from sd_core.engine import Engine

    def make(**changes):
        return Engine(dataclasses.replace(engine_settings, **changes), catalog=lora_catalog)

    return make


@pytest.fixture(scope="module")
def lora_engine(make_lora_engine):
    return make_lora_engine()


def adapters_in(engine, model_name) -> dict[str, list[str]]:
    pipe = engine.pool.get(model_name).pipeline("txt2img")
    return {k: v for k, v in pipe.get_list_adapters().items() if v}


# --- what LoRAs do to images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,name", [("tiny-sd15", "tiny-style"), ("tiny-sdxl", "tiny-xl-style")])
def test_lora_changes_the_image_and_more_with_its_scale(lora_engine, model, name):
    # Random tiny models are chaotic (the change saturates quickly), so the scales compared are far apart.
    base = generate(lora_engine, model=model)
    zero, weak, strong = (generate(lora_engine, model=model, loras=[lora(name, s)]) for s in (0.0, 0.05, 0.5))
    assert np.abs(pixels(zero) - pixels(base)).max() <= 1
    assert 1.0 < mean_diff(base, weak) and 1.5 * mean_diff(base, weak) < mean_diff(base, strong)
    assert strong.parameters.startswith(f"a red fox in the snow <lora:{name}:0.5>\n")  # as A1111 writes it
    assert list(a1111.lora_hashes(a1111.parse(strong.parameters))) == [name]


@pytest.mark.parametrize("model,peft,kohya", [("tiny-sd15", "tiny-style", "tiny-style-kohya"),
                                              ("tiny-sdxl", "tiny-xl-style", "tiny-xl-style-kohya")])
def test_kohya_file_with_alpha_equals_peft_file(lora_engine, model, peft, kohya):
    # The kohya file holds the same matrices with alpha = rank / 2: at scale 1 it is the peft file at 0.5.
    from_kohya = generate(lora_engine, model=model, loras=[lora(kohya)])
    from_peft = generate(lora_engine, model=model, loras=[lora(peft, 0.5)])
    assert np.abs(pixels(from_kohya) - pixels(from_peft)).max() <= 1
    assert mean_diff(from_kohya, generate(lora_engine, model=model)) > 1.0


def test_text_encoder_scale_is_separate(lora_engine):
    both = generate(lora_engine, loras=[lora("tiny-style", 1.0)])
    unet_only = generate(lora_engine, loras=[lora("tiny-style", 1.0, te=0.0)])
    text_only = generate(lora_engine, loras=[lora("tiny-style", 0.0, te=1.0)])
    base = generate(lora_engine)
    assert mean_diff(both, unet_only) > 0.5 and mean_diff(text_only, base) > 0.5 and mean_diff(both, text_only) > 0.5


def test_two_loras_combine(lora_engine):
    first = generate(lora_engine, loras=[lora("tiny-style")])
    second = generate(lora_engine, loras=[lora("other-style")])
    both = generate(lora_engine, loras=[lora("tiny-style"), lora("other-style")])
    assert mean_diff(both, first) > 1.0 and mean_diff(both, second) > 1.0
    written = a1111.parse(both.parameters)
    assert a1111.loras(written["Prompt"]) == {"tiny-style": (1.0, 1.0), "other-style": (1.0, 1.0)}
    assert list(a1111.lora_hashes(written)) == ["tiny-style", "other-style"]
    # Order does not matter.
    swapped = generate(lora_engine, loras=[lora("other-style"), lora("tiny-style")])
    assert np.abs(pixels(both) - pixels(swapped)).max() <= 1


@pytest.mark.parametrize("model,name", [("tiny-sd15", "tiny-style"), ("tiny-sdxl", "tiny-xl-style")])
def test_no_lora_after_lora_gives_exactly_the_base_image(lora_engine, model, name):
    base = generate(lora_engine, model=model, seed=11)
    generate(lora_engine, model=model, seed=11, loras=[lora(name)])
    assert np.array_equal(pixels(generate(lora_engine, model=model, seed=11)), pixels(base))


def test_switching_back_and_forth_is_reproducible(lora_engine):
    first = generate(lora_engine, loras=[lora("tiny-style", 0.8)])
    generate(lora_engine, loras=[lora("other-style")])
    generate(lora_engine, loras=[lora("tiny-style", 0.3), lora("other-style", 0.6)])
    assert np.array_equal(pixels(generate(lora_engine, loras=[lora("tiny-style", 0.8)])), pixels(first))


def test_manifest_scale_is_the_default_scale(lora_engine):
    by_default = generate(lora_engine, loras=[lora("strong-default")])  # manifest: scale 0.5
    assert np.abs(pixels(by_default) - pixels(generate(lora_engine, loras=[lora("tiny-style", 0.5)]))).max() <= 1
    explicit = generate(lora_engine, loras=[lora("strong-default", 1.0)])
    assert np.abs(pixels(explicit) - pixels(generate(lora_engine, loras=[lora("tiny-style", 1.0)]))).max() <= 1


# --- A1111 prompt tags --------------------------------------------------------------------------------------------
def test_prompt_tag_gives_the_same_image_as_the_field_and_is_stripped(lora_engine):
    tagged = generate(lora_engine, prompt="a red fox <lora:tiny-style:0.7> in the snow")
    field = generate(lora_engine, prompt="a red fox in the snow", loras=[lora("tiny-style", 0.7)])
    assert np.array_equal(pixels(tagged), pixels(field))
    text = read_parameters(tagged.images[0].data)
    # Stripped before the text encoder, but kept in the infotext where the user put it (as A1111 does).
    assert text.startswith("a red fox <lora:tiny-style:0.7> in the snow\n")
    assert list(a1111.lora_hashes(a1111.parse(text))) == ["tiny-style"]


def test_prompt_tags_and_field_combine(lora_engine):
    mixed = generate(lora_engine, prompt="a red fox in the snow <lora:other-style>", loras=[lora("tiny-style")])
    both = generate(lora_engine, loras=[lora("tiny-style"), lora("other-style")])
    assert np.abs(pixels(mixed) - pixels(both)).max() <= 1


def test_parse_prompt_tags():
    assert parse_prompt_tags("plain prompt") == ("plain prompt", [])
    text, specs = parse_prompt_tags("<lora:a>a cat, <LORA:b:0.25>  on a mat <lora:c:0.5:0.8> <lora:d:unet=0.3:te=0.2>")
    assert text == "a cat, on a mat"
    assert [(s.source, s.scale, s.text_encoder_scale) for s in specs] == [
        ("a", 1.0, None), ("b", 0.25, 0.25), ("c", 0.8, 0.5), ("d", 0.3, 0.2)]
    assert "scale" not in specs[0].model_fields_set  # <lora:name>: the manifest's scale applies
    for bad in ("<lora:x:strong>", "<lora::1>", "<lora:x:99>", "<lora:x:1:2:3:4>"):
        with pytest.raises(InvalidRequest, match="^prompt: <lora:"):
            parse_prompt_tags(f"a cat {bad}")


# --- errors leave the model as it was -----------------------------------------------------------------------------
def test_lora_for_another_architecture_is_refused_and_base_intact(lora_engine):
    base = generate(lora_engine, model="tiny-sdxl", seed=21)
    before = adapters_in(lora_engine, "tiny-sdxl")
    with pytest.raises(InvalidRequest, match=r"^loras: wrong-arch: does not fit tiny-sdxl \(sdxl\)"):
        generate(lora_engine, model="tiny-sdxl", seed=21, loras=[lora("wrong-arch")])
    assert adapters_in(lora_engine, "tiny-sdxl") == before
    assert np.array_equal(pixels(generate(lora_engine, model="tiny-sdxl", seed=21)), pixels(base))


def test_half_fitting_lora_is_fully_removed_and_active_set_kept(lora_engine):
    with_style = generate(lora_engine, seed=22, loras=[lora("tiny-style")])
    before = adapters_in(lora_engine, "tiny-sd15")
    # The UNet part fits, the text-encoder part does not: nothing of it may stay behind.
    with pytest.raises(InvalidRequest, match="^loras: half-fit: does not fit tiny-sd15"):
        generate(lora_engine, seed=22, loras=[lora("tiny-style"), lora("half-fit")])
    assert adapters_in(lora_engine, "tiny-sd15") == before
    assert np.array_equal(pixels(generate(lora_engine, seed=22, loras=[lora("tiny-style")])), pixels(with_style))
    base = generate(lora_engine, seed=22, model="tiny-sd15-single")  # same weights, never had a LoRA
    assert np.abs(pixels(generate(lora_engine, seed=22)) - pixels(base)).max() <= 2


@pytest.mark.parametrize("name", ["pickled", "disguised"])
def test_pickle_lora_is_refused(lora_engine, name):
    with pytest.raises(InvalidRequest, match=f"^loras: {name}: not a .safetensors file.*SD_ALLOW_PICKLE"):
        generate(lora_engine, loras=[lora(name)])


@pytest.mark.parametrize("name", ["pickled", "disguised"])
def test_pickle_lora_loads_when_allowed(make_lora_engine, name):
    engine = make_lora_engine(allow_pickle=True)
    # The single-file model: with SD_ALLOW_PICKLE, loading diffusers folders is a separate matter (pipelines.py).
    model = "tiny-sd15-single"
    assert np.abs(pixels(generate(engine, model=model, loras=[lora(name)])) -
                  pixels(generate(engine, model=model, loras=[lora("tiny-style")]))).max() <= 1


@pytest.mark.parametrize("spec,match", [
    (lora("no-such-lora"), r"^loras: unknown LoRA 'no-such-lora' for tiny-sd15 \(sd15\); available: .*tiny-style"),
    (lora("tiny-xl-style"), r"^loras: unknown LoRA 'tiny-xl-style' for tiny-sd15"),  # an SDXL LoRA's name
    (lora("/etc/passwd"), r"^loras: "),  # local paths come only from manifests
    (lora("file:///etc/passwd"), r"^loras: file:// URLs are not accepted"),
    (lora("ftp://example.com/x.safetensors"), r"^loras: URL scheme 'ftp'"),
])
def test_bad_sources_name_the_field(lora_engine, spec, match):
    with pytest.raises(InvalidRequest, match=match):
        generate(lora_engine, loras=[spec])


def test_unknown_lora_in_prompt_tag(lora_engine):
    with pytest.raises(ModelNotFound, match="^loras: unknown LoRA 'nope'"):
        generate(lora_engine, prompt="a fox <lora:nope:0.5>")


def test_same_lora_twice_and_too_many_are_refused(lora_engine):
    with pytest.raises(InvalidRequest, match="requested twice"):
        generate(lora_engine, prompt="a fox <lora:tiny-style>", loras=[lora("tiny-style", 0.2)])
    tags = " ".join(f"<lora:tiny-style:{i / 10}>" for i in range(5))
    with pytest.raises(InvalidRequest, match="^loras: 9 LoRAs requested"):
        generate(lora_engine, prompt=f"a fox {tags}", loras=[lora("other-style")] * 4)


def test_cancel_during_lora_loading_leaves_nothing_active(make_lora_engine):
    engine = make_lora_engine()
    base = generate(engine, seed=5)
    steps = []
    with pytest.raises(Cancelled):
        request = GenerationRequest(prompt="a red fox in the snow", seed=5, loras=[LoraSpec(source="tiny-style")])
        engine.generate(request, should_cancel=lambda: True, on_step=lambda done, total: steps.append(done))
    assert steps == []  # cancelled before denoising
    assert np.array_equal(pixels(generate(engine, seed=5)), pixels(base))
    styled = generate(engine, seed=5, loras=[lora("tiny-style")])
    assert mean_diff(styled, base) > 1.0


# --- memory: LRU of adapters, fusing ------------------------------------------------------------------------------
def test_loaded_adapters_are_bounded(make_lora_engine):
    engine = make_lora_engine(lora_max_loaded=2)
    first = generate(engine, loras=[lora("tiny-style")])
    generate(engine, loras=[lora("other-style")])
    generate(engine, loras=[lora("tiny-style-kohya")])
    model = engine.pool.get("tiny-sd15")
    assert engine.loras.loaded(model) == ["other-style", "tiny-style-kohya"]
    assert sum(len(v) for v in adapters_in(engine, "tiny-sd15").values()) == 2 * 2  # unet + text encoder
    # A set larger than the limit still runs (all its LoRAs are needed at once).
    generate(engine, loras=[lora("tiny-style"), lora("other-style"), lora("tiny-style-kohya")])
    assert np.array_equal(pixels(generate(engine, loras=[lora("tiny-style")])), pixels(first))


def base_weights(engine, model_name) -> dict[str, torch.Tensor]:
    """The base model's own weights (LoRA matrices left out), by their original names."""
    pipe = engine.pool.get(model_name).pipeline("txt2img")
    weights = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is not None:
            for name, tensor in module.state_dict().items():
                if ".lora_" not in name:
                    weights[f"{component}.{name.replace('.base_layer', '')}"] = tensor.clone()
    return weights


@pytest.mark.parametrize("model,names", [("tiny-sd15", ["tiny-style", "other-style"]),
                                         ("tiny-sdxl", ["tiny-xl-style"])])
def test_fusing_a_repeated_set_and_unfusing_restores_the_base(make_lora_engine, model, names):
    engine = make_lora_engine(lora_fuse_after=2)
    base = generate(engine, model=model, seed=8)
    snapshot = base_weights(engine, model)
    specs = [lora(name, 0.7, te=0.4) for name in names]
    unfused = generate(engine, model=model, seed=8, loras=specs)
    generate(engine, model=model, seed=8, loras=specs)  # second use in a row: fused after it
    state = engine.loras._states[engine.pool.get(model)]
    assert state.fused
    fused = generate(engine, model=model, seed=8, loras=specs)
    assert np.abs(pixels(fused) - pixels(unfused)).max() <= 2
    assert np.array_equal(pixels(generate(engine, model=model, seed=8)), pixels(base))
    assert not state.fused
    after = base_weights(engine, model)
    drift = max(float((after[name] - tensor).abs().max()) for name, tensor in snapshot.items())
    assert drift <= 1e-5, drift  # the base weights are restored (bit for bit: backed up before fusing)
    assert np.array_equal(pixels(generate(engine, model=model, seed=8, loras=specs)), pixels(unfused))


# --- concurrency ----------------------------------------------------------------------------------------------------
def test_concurrent_requests_with_different_lora_sets_never_mix(make_lora_engine):
    engine = make_lora_engine(max_batch_images=8, batch_wait_ms=200)
    sets = [[], [lora("tiny-style")], [lora("other-style")], [lora("tiny-style"), lora("other-style", 0.5)],
            [lora("tiny-style")], []]
    requests = [GenerationRequest(prompt=f"a red fox, take {i}", seed=40 + i, loras=s) for i, s in enumerate(sets)]
    alone = [pixels(engine.generate(r)) for r in requests]
    def worker(index, barrier, results):
        barrier.wait()
        try:
            results[index] = engine.generate(requests[index])
        except Exception as exc:  # noqa: BLE001 - inspected below
            results[index] = exc

    for _round in range(2):
        results: list = [None] * len(requests)
        barrier = threading.Barrier(len(requests))
        threads = [threading.Thread(target=worker, args=(i, barrier, results)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for index, result in enumerate(results):
            assert not isinstance(result, BaseException), result
            # Same-set requests may share a batch (float noise only); a leaked adapter changes pixels by ~10+.
            assert np.abs(pixels(result) - alone[index]).max() <= 2, (index, sets[index])


# --- LoRAs in object storage ----------------------------------------------------------------------------------------
def test_lora_from_s3_is_fetched_once_then_served_from_the_cache(
    s3_env, s3_bucket, s3_proxy, tiny_bucket, engine_settings, lora_catalog, tmp_path
):
    from sd_core.engine import Engine
    from sd_core.errors import ChecksumMismatch

    peft = tiny_bucket / "loras" / "tiny-sd15-peft.safetensors"
    s3_env.client().upload_file(str(peft), s3_bucket, "loras/ink-v1.safetensors")
    url = f"s3://{s3_bucket}/loras/ink-v1.safetensors"
    manifests = dict(lora_catalog.manifests)
    manifests["tiny-sd15"] = manifests["tiny-sd15"].model_copy(update={"loras": [
        *manifests["tiny-sd15"].loras, LoraEntry(name="ink-pinned-wrong", uri=url, sha256="0" * 64)]})
    settings = dataclasses.replace(engine_settings, s3_endpoint_url=s3_proxy.endpoint_url, cache_dir=tmp_path / "c",
                                   user_s3_buckets=(f"{s3_bucket}/loras/",))  # an allow-listed prefix
    engine = Engine(settings, catalog=ModelCatalog(manifests))

    local = generate(engine, seed=9, loras=[lora("tiny-style", 0.6)])
    from_s3 = generate(engine, seed=9, loras=[lora(url, 0.6)])
    assert np.array_equal(pixels(from_s3), pixels(local))
    assert s3_proxy.count("GET") >= 1 and s3_proxy.bytes_sent("GET") == peft.stat().st_size
    written = a1111.parse(from_s3.parameters)
    assert a1111.loras(written["Prompt"]) == {"ink-v1": (0.6, 0.6)}
    assert a1111.lora_hashes(written) == {"ink-v1": hashlib.sha256(peft.read_bytes()).hexdigest()[:12]}

    s3_proxy.reset()  # the second request, and a new worker on the same cache: not one request to the store
    assert np.array_equal(pixels(generate(engine, seed=9, loras=[lora(url, 0.6)])), pixels(local))
    restarted = Engine(settings, catalog=ModelCatalog(manifests))
    assert np.array_equal(pixels(generate(restarted, seed=9, loras=[lora(url, 0.6)])), pixels(local))
    assert s3_proxy.requests == []

    with pytest.raises(InvalidRequest, match=f"^loras: LoRA s3://{s3_bucket}/loras/missing.safetensors: .*not found"):
        generate(engine, loras=[lora(f"s3://{s3_bucket}/loras/missing.safetensors")])
    with pytest.raises(ChecksumMismatch, match="^loras: LoRA ink-pinned-wrong: sha256 mismatch"):
        generate(engine, loras=[lora("ink-pinned-wrong")])


def test_s3_lora_outside_the_allow_list_is_refused_before_any_request(
    s3_env, s3_bucket, s3_proxy, tiny_bucket, engine_settings, lora_catalog, tmp_path
):
    from sd_core.engine import Engine

    peft = tiny_bucket / "loras" / "tiny-sd15-peft.safetensors"
    s3_env.client().upload_file(str(peft), s3_bucket, "private/ink.safetensors")
    settings = dataclasses.replace(engine_settings, s3_endpoint_url=s3_proxy.endpoint_url, cache_dir=tmp_path / "c",
                                   user_s3_buckets=(f"{s3_bucket}/loras/",))
    engine = Engine(settings, catalog=lora_catalog)
    s3_proxy.reset()
    for url in (f"s3://{s3_bucket}/private/ink.safetensors", f"s3://{s3_bucket}/loras-x/ink.safetensors",
                "s3://another-bucket/loras/ink.safetensors"):
        with pytest.raises(InvalidRequest) as caught:
            generate(engine, loras=[lora(url + "?token=hush")])
        message = str(caught.value)
        assert message.startswith("loras: ") and "SD_USER_S3_BUCKETS" in message and "hush" not in message, message
    assert s3_proxy.requests == []  # refused by the policy: the store was never asked (not even whether it exists)
