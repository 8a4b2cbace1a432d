"""predict.py's Cog inputs equal GenerationRequest's fields, `cog build` can read them, the schema is fresh."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.checks.write_cog_schema import build_schema
from sd_core.schema import ControlNetUnit, GenerationRequest, HiresSpec, IpAdapterSpec, LoraSpec, OutpaintSpec

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "checks" / "write_cog_schema.py"

# GenerationRequest fields that Cog exposes differently, on purpose:
#   image, mask -> Cog file inputs (cog.Path, format uri); run() gets the data URI / URL text (cog_inputs.py).
#   loras       -> lora_weights (LoraSpec.source) + lora_scale (LoraSpec.scale), and a second LoRA as extra_lora +
#                  extra_lora_scale: Replicate's LoRA convention. These adapter-only inputs are declared here, each
#                  with the LoraSpec field it fills (one entry of `loras` per source given).
#   hires       -> hires_scale, hires_upscaler, hires_steps, hires_denoising_strength (HiresSpec's fields; the rest
#                  of HiresSpec at its defaults); hires_scale 0 (its default) means no hires fix.
#   embeddings  -> one string of name=URL pairs (cog_inputs.parse_embedding_list).
#   sigmas      -> one string of comma-separated numbers (cog_inputs.parse_sigmas).
#   outpaint    -> outpaint_left/_right/_top/_bottom (OutpaintSpec's fields; all 0: no outpainting).
#   controlnets -> one unit: control_image (a file input, like image) + control_model/scale/start/end/
#                  preprocessor; control_units: more units as one JSON string (ControlNetUnit items).
#   ip_adapters -> ip_adapter_image (a Cog file input, IpAdapterSpec.image) + ip_adapter_scale (IpAdapterSpec.scale):
#                  one image for the model's first IP-Adapter.
AS_FILES = {"image", "mask"}
REPLACED = {"loras", "hires", "embeddings", "sigmas", "outpaint", "controlnets", "ip_adapters"}
LORA_INPUTS = {"lora_weights": ("loras", "source"), "lora_scale": ("loras", "scale"),
               "extra_lora": ("loras", "source"), "extra_lora_scale": ("loras", "scale")}
# upscale-only jobs (sd_core/upscale_job.py's UpscaleRequest, not GenerationRequest): upscale_only > 0 switches to one
UPSCALE_INPUTS = {"upscale_only": "scale", "upscaler": "upscaler"}
HIRES_INPUTS = {"hires_scale": "scale", "hires_upscaler": "upscaler", "hires_steps": "steps",
                "hires_denoising_strength": "denoising_strength"}
OUTPAINT_INPUTS = {f"outpaint_{side}": side for side in ("left", "right", "top", "bottom")}
CONTROL_INPUTS = {"control_model": "model", "control_scale": "scale", "control_start": "start", "control_end": "end",
                  "control_preprocessor": "preprocessor"}
IP_ADAPTER_INPUTS = {"ip_adapter_image": ("ip_adapters", "image"), "ip_adapter_scale": ("ip_adapters", "scale")}
# Cog inputs have no exclusive bounds: GenerationRequest's `gt` becomes Cog's `ge` of the same value, and the engine
# rejects the boundary value itself with a readable error (a failed prediction naming the field).
EXCLUSIVE_BOUNDS = {("strength", "minimum"), ("denoising_strength", "minimum")}


@pytest.fixture(scope="module")
def openapi() -> dict:
    return build_schema("predict", "Runner")


@pytest.fixture(scope="module")
def cog_inputs(openapi) -> dict[str, dict]:
    """Cog's Input properties with `choices` resolved: name -> {type, enum, minimum, ..., default, nullable}."""
    schemas = openapi["components"]["schemas"]
    inputs = {}
    for name, prop in schemas["Input"]["properties"].items():
        flat = {k: v for k, v in prop.items() if k not in ("allOf", "x-order", "title", "description")}
        for ref in prop.get("allOf", []):
            enum = schemas[ref["$ref"].rsplit("/", 1)[1]]
            flat.update(type=enum["type"], enum=enum["enum"])
        flat.setdefault("nullable", False)
        inputs[name] = flat
    return inputs


def pydantic_field(model, name: str) -> dict:
    """One field of a pydantic model in the same flat form (anyOf-with-null -> nullable, exclusive -> inclusive)."""
    prop = dict(model.model_json_schema()["properties"][name])
    flat = {"nullable": False}
    branches = prop.pop("anyOf", None)
    if branches:
        flat["nullable"] = {"type": "null"} in branches
        (prop_type,) = [b for b in branches if b != {"type": "null"}]
        prop.update(prop_type)
    for key in ("type", "enum", "minimum", "maximum", "minLength", "maxLength"):
        if key in prop:
            flat[key] = prop[key]
    for exclusive, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if exclusive in prop:
            assert (name, inclusive) in EXCLUSIVE_BOUNDS, f"{name}: new exclusive bound; list it or change it"
            flat[inclusive] = prop[exclusive]
    info = model.model_fields[name]
    flat["default"] = info.get_default(call_default_factory=True)
    return flat


def comparable(cog: dict) -> dict:
    out = {k: v for k, v in cog.items() if k in ("type", "enum", "minimum", "maximum", "minLength", "maxLength")}
    out["nullable"] = cog["nullable"]
    out["default"] = cog.get("default")
    return out


def test_cog_inputs_are_exactly_the_request_fields(cog_inputs):
    expected = ((set(GenerationRequest.model_fields) - REPLACED) | set(LORA_INPUTS) | set(HIRES_INPUTS)
                | set(UPSCALE_INPUTS)
                | {"embeddings", "sigmas"} | set(OUTPAINT_INPUTS) | set(CONTROL_INPUTS)
                | {"control_image", "control_units"}
                | set(IP_ADAPTER_INPUTS))
    assert set(cog_inputs) == expected


@pytest.mark.parametrize("name", sorted(set(GenerationRequest.model_fields) - AS_FILES - REPLACED))
def test_cog_input_has_the_request_fields_default_bounds_and_choices(cog_inputs, name):
    assert comparable(cog_inputs[name]) == pydantic_field(GenerationRequest, name)


@pytest.mark.parametrize("name", sorted(AS_FILES))
def test_image_inputs_are_optional_cog_files(cog_inputs, name):
    assert pydantic_field(GenerationRequest, name) == {"nullable": True, "type": "string", "default": None}
    assert cog_inputs[name] == {"type": "string", "format": "uri", "nullable": True, "default": None}


def test_adapter_only_inputs_replace_exactly_the_replaced_fields():
    replaced = {field for field, _ in (*LORA_INPUTS.values(), *IP_ADAPTER_INPUTS.values())}
    assert replaced | {"hires", "embeddings", "sigmas", "outpaint", "controlnets"} == REPLACED
    assert {spec_field for _, spec_field in LORA_INPUTS.values()} <= set(LoraSpec.model_fields)
    assert {spec_field for _, spec_field in IP_ADAPTER_INPUTS.values()} <= set(IpAdapterSpec.model_fields)


def test_sigmas_input_is_one_optional_string_of_numbers(cog_inputs):
    import cog_inputs as parsing
    from sd_core.errors import InvalidRequest

    assert GenerationRequest.model_fields["sigmas"].default is None  # the model's own schedule unless asked
    assert cog_inputs["sigmas"]["type"] == "string" and cog_inputs["sigmas"]["nullable"]
    assert parsing.parse_sigmas(" 1, 0.75,0.5 ") == [1.0, 0.75, 0.5] and parsing.parse_sigmas("") is None
    with pytest.raises(InvalidRequest, match="^sigmas: expected numbers separated by commas; got 'x'"):
        parsing.parse_sigmas("1, x")


def test_ip_adapter_inputs_follow_ip_adapter_spec(cog_inputs):
    assert GenerationRequest.model_fields["ip_adapters"].default_factory() == []  # no image prompt unless asked
    assert pydantic_field(IpAdapterSpec, "image")["type"] == "string"
    assert cog_inputs["ip_adapter_image"] == {"type": "string", "format": "uri", "nullable": True, "default": None}
    assert comparable(cog_inputs["ip_adapter_scale"]) == pydantic_field(IpAdapterSpec, "scale")


@pytest.mark.parametrize("name", sorted(LORA_INPUTS))
def test_lora_inputs_follow_lora_spec(cog_inputs, name):
    assert GenerationRequest.model_fields["loras"].default_factory() == []  # no LoRA unless asked: input optional
    spec_field = LORA_INPUTS[name][1]
    expected = pydantic_field(LoraSpec, spec_field)
    if spec_field == "source":  # each LoRA source input is optional: none given, no entry in `loras`
        expected = {**expected, "nullable": True, "default": None}
    assert comparable(cog_inputs[name]) == expected


@pytest.mark.parametrize("name", sorted(HIRES_INPUTS))
def test_hires_inputs_follow_hires_spec(cog_inputs, name):
    expected = pydantic_field(HiresSpec, HIRES_INPUTS[name])
    assert GenerationRequest.model_fields["hires"].default is None  # no hires fix unless asked
    if name == "hires_scale":  # the one difference: 0, its default, is "off" (HiresSpec's scale starts at 1)
        assert (expected["minimum"], expected["default"]) == (1.0, 2.0)
        expected = {**expected, "minimum": 0.0, "default": 0.0}
    assert comparable(cog_inputs[name]) == expected


def test_upscale_only_inputs_follow_the_upscale_request(cog_inputs):
    from sd_core.upscale_job import UpscaleRequest

    scale = UpscaleRequest.model_fields["scale"].metadata  # gt=0, le=16
    maximum = next(bound.le for bound in scale if getattr(bound, "le", None) is not None)
    assert comparable(cog_inputs["upscale_only"]) == {"type": "number", "minimum": 0.0,  # 0, its default: generate
                                                      "maximum": maximum, "default": 0.0, "nullable": False}
    assert comparable(cog_inputs["upscaler"]) == {**pydantic_field(UpscaleRequest, "upscaler"), "minLength": 1}


def test_embeddings_input_is_an_optional_string_of_pairs(cog_inputs):
    from cog_inputs import parse_embedding_list

    assert GenerationRequest.model_fields["embeddings"].default_factory() == []
    assert comparable(cog_inputs["embeddings"]) == {"type": "string", "maxLength": 40000, "nullable": True,
                                                    "default": None}
    assert parse_embedding_list(None) == []
    assert parse_embedding_list(" neg=https://h.example/a.safetensors, x=s3://b/k ") == [
        {"name": "neg", "source": "https://h.example/a.safetensors"}, {"name": "x", "source": "s3://b/k"}]


@pytest.mark.parametrize("name", sorted(OUTPAINT_INPUTS))
def test_outpaint_inputs_follow_outpaint_spec(cog_inputs, name):
    assert GenerationRequest.model_fields["outpaint"].default is None  # all four 0: no outpainting
    assert comparable(cog_inputs[name]) == pydantic_field(OutpaintSpec, OUTPAINT_INPUTS[name])


def test_control_inputs_follow_controlnet_unit(cog_inputs):
    assert GenerationRequest.model_fields["controlnets"].default_factory() == []  # no unit unless asked
    assert cog_inputs["control_image"] == {"type": "string", "format": "uri", "nullable": True, "default": None}
    model = pydantic_field(ControlNetUnit, "model")
    assert comparable(cog_inputs["control_model"]) == {**model, "nullable": True, "default": None}
    for name in ("control_scale", "control_start", "control_end", "control_preprocessor"):
        assert comparable(cog_inputs[name]) == pydantic_field(ControlNetUnit, CONTROL_INPUTS[name])


def test_the_comparison_notices_a_drifted_bound(cog_inputs):
    drifted = {**cog_inputs["num_inference_steps"], "maximum": 50}
    assert comparable(drifted) != pydantic_field(GenerationRequest, "num_inference_steps")


def test_run_is_async_and_concurrent():
    predict = pytest.importorskip("predict")
    assert inspect.iscoroutinefunction(predict.Runner.run)
    assert predict.Runner.run.__cog_concurrent_max__ > 1


# --- what `cog build` can read statically ------------------------------------------------------------------------
def _module_literals(tree: ast.Module) -> dict[str, object]:
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def test_run_signature_uses_only_literals_cog_build_can_read():
    """`cog build` parses predict.py (tree-sitter, no Python): Input() arguments must be plain literals. It reads
    ge/le/min_length/max_length as plain numbers (no `_`, no expressions), strings without escapes or implicit
    concatenation, and choices as a list literal or a module-level list; anything else is dropped silently."""
    source = (REPO / "predict.py").read_text()
    tree = ast.parse(source)
    module_values = _module_literals(tree)
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runner")
    run = next(n for n in runner.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "run")
    decorator = ast.get_source_segment(source, run.decorator_list[0])
    assert decorator.startswith("cog.concurrent(max=") and int(decorator[len("cog.concurrent(max="):-1]) > 1
    problems = []
    for arg, default in zip(run.args.args[1:], run.args.defaults, strict=True):
        assert isinstance(default, ast.Call) and ast.unparse(default.func) == "Input", arg.arg
        for kw in default.keywords:
            seg = ast.get_source_segment(source, kw.value)
            where = f"{arg.arg}.{kw.arg} = {seg}"
            if kw.arg in ("ge", "le", "min_length", "max_length"):
                try:
                    float(seg)
                    assert "_" not in seg
                except (ValueError, AssertionError):
                    problems.append(f"{where}: not a plain number")
            elif kw.arg == "choices":
                value = module_values.get(seg) if isinstance(kw.value, ast.Name) else None
                if not isinstance(kw.value, ast.List | ast.Name) or (isinstance(kw.value, ast.Name) and value is None):
                    problems.append(f"{where}: not a list literal or module-level list")
            elif kw.arg == "description":
                plain = seg[:1] in "\"'" and seg[-1:] == seg[:1] and seg.count(seg[0]) == 2 and "\\" not in seg
                if not plain:
                    problems.append(f"{where}: not one plain string literal")
            elif kw.arg == "default":
                try:
                    ast.literal_eval(kw.value)
                except ValueError:
                    problems.append(f"{where}: not a literal")
    assert problems == []
    assert ast.unparse(run.returns) == "list[Path]"


# --- .cog/openapi_schema.json -------------------------------------------------------------------------------------
def test_committed_openapi_schema_is_current():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_stale_schema(tmp_path, openapi):
    stale = json.loads(json.dumps(openapi))
    stale["components"]["schemas"]["Input"]["properties"]["num_outputs"]["maximum"] = 99
    path = tmp_path / "openapi_schema.json"
    path.write_text(json.dumps(stale, indent=2) + "\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--output", str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 1 and "stale" in result.stderr


def test_control_units_input_is_one_optional_json_list(cog_inputs):
    import cog_inputs as parsing
    from sd_core.errors import InvalidRequest

    assert cog_inputs["control_units"]["type"] == "string" and cog_inputs["control_units"]["nullable"]
    unit = {"model": "m", "image": "data:image/png;base64,AA==", "scale": 0.5, "mode": "prompt"}
    assert parsing.parse_control_units(json.dumps([unit])) == [unit] and parsing.parse_control_units(" ") == []
    with pytest.raises(InvalidRequest, match="^control_units: not valid JSON"):
        parsing.parse_control_units("[{")
    with pytest.raises(InvalidRequest, match="^control_units: expected a JSON list of unit objects"):
        parsing.parse_control_units('{"model": "m"}')
