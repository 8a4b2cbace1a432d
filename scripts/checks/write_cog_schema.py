#!/usr/bin/env python
"""Write .cog/openapi_schema.json from predict.py, as `cog build` would; `--check` fails when the file is stale.

The Cog prediction server (coglet) validates inputs only against that file; `cog build` normally writes it, and the
Cog CLI is not part of this project's toolchain. The inputs and the output type come from the installed `cog`
package's own inspector (`cog._inspector.create_predictor`, the runtime introspection Cog uses); this script lays them
out in the OpenAPI 3.0.2 document that Cog's schema generator produces (Input, Output, one enum schema per `choices`
input, the prediction request/response envelope, and the fixed paths).

    python scripts/checks/write_cog_schema.py            # (re)write .cog/openapi_schema.json
    python scripts/checks/write_cog_schema.py --check    # exit 1 if the committed file differs from predict.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / ".cog" / "openapi_schema.json"


def runner_ref(repo: Path = REPO_ROOT) -> tuple[str, str]:
    """(module, class) of the runner that cog.yaml's `run:` names, e.g. ("predict", "Runner")."""
    config = yaml.safe_load((repo / "cog.yaml").read_text())
    path, _, cls = config["run"].partition(":")
    return Path(path).stem, cls


def _number(value: float) -> int | float:
    # Cog's generator emits JSON numbers without a fraction when they have none (64, not 64.0).
    return int(value) if float(value).is_integer() else value


def _json_value(value: Any) -> Any:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _title(name: str) -> str:
    return name.replace("_", " ").title()


def input_schema(info, run_fn) -> tuple[dict, dict]:
    """The Input object schema and the enum schemas of `choices` inputs (one per input, named after it)."""
    from cog import _adt
    from cog.input import FieldInfo

    declared = inspect.signature(run_fn).parameters
    optional = (_adt.Repetition.OPTIONAL, _adt.Repetition.OPTIONAL_REPEATED)
    properties, enums, required = {}, {}, []
    for name, field in info.inputs.items():
        spec = declared[name].default if name in declared else None
        spec = spec if isinstance(spec, FieldInfo) else None
        nullable = field.type.repetition in optional
        prop: dict[str, Any] = {"x-order": field.order}
        if field.choices is not None:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": [_json_value(c) for c in field.choices],
                "type": field.type.primitive.json_type()["type"],
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(field.type.json_type())
        if field.default is not None:
            prop["default"] = _json_value(field.type.json_encode(field.default))
        elif nullable and spec is not None:
            prop["default"] = None  # `Input(default=None)` on an optional input: Cog writes an explicit null
        elif not nullable:
            required.append(name)
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge)
        if field.le is not None:
            prop["maximum"] = _number(field.le)
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.deprecated:
            prop["deprecated"] = True
        if spec is not None and spec.accept is not None:
            prop["x-cog-accept"] = spec.accept
        properties[name] = dict(sorted(prop.items()))
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _json_response(schema: dict) -> dict:
    return {"description": "Successful Response", "content": {"application/json": {"schema": schema}}}


def _validation_error_response() -> dict:
    return {
        "description": "Validation Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
    }


def build_schema(module: str = "predict", cls: str = "Runner") -> dict:
    """The OpenAPI document for runner `cls` in module `module` (importable from the repository root)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from cog import _inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = _inspector.create_predictor(module, cls)
    runner = getattr(sys.modules[module], cls)
    run_fn = _inspector._unwrap(runner.run if "run" in vars(runner) else runner.predict)
    inputs, enums = input_schema(info, run_fn)
    output = info.output.json_type()

    text = {"type": "string"}
    date = {"type": "string", "format": "date-time"}
    schemas: dict[str, Any] = {"Input": inputs, "Output": output, **enums}
    schemas["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {"id": {"title": "Id", **text}, "input": {"$ref": "#/components/schemas/Input"}},
    }
    schemas["PredictionResponse"] = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", **text},
            "version": {"title": "Version", **text},
            "created_at": {"title": "Created At", **date},
            "started_at": {"title": "Started At", **date},
            "completed_at": {"title": "Completed At", **date},
            "status": {"title": "Status", **text},
            "error": {"title": "Error", **text},
            "logs": {"title": "Logs", **text},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    schemas["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    schemas["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {
                "title": "Detail",
                "type": "array",
                "items": {"$ref": "#/components/schemas/ValidationError"},
            }
        },
    }
    schemas["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {"title": "Location", "type": "array", "items": {"anyOf": [text, {"type": "integer"}]}},
            "msg": {"title": "Message", **text},
            "type": {"title": "Error Type", **text},
        },
    }
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": _json_response({})}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": _json_response({})},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}
                },
                "responses": {
                    "200": _json_response({"$ref": "#/components/schemas/PredictionResponse"}),
                    "422": _validation_error_response(),
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": _json_response({}), "422": _validation_error_response()},
            }
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is missing or stale, write nothing")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: .cog/openapi_schema.json")
    args = parser.parse_args(argv)

    text = render(build_schema(*runner_ref()))
    current = args.output.read_text() if args.output.exists() else None
    if args.check:
        if current != text:
            state = "missing" if current is None else "stale"
            print(f"{args.output} is {state}: run `python scripts/checks/write_cog_schema.py`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if current != text:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    else:
        print(f"{args.output} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
