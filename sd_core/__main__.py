"""Command line: `python -m sd_core generate ...` runs one request through the engine and writes the images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import SDError
from .schema import parse_request
from .serving import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from a JSON request (fields of GenerationRequest)")
    gen.add_argument("--request", default="{}", help='JSON object, e.g. \'{"prompt": "a red fox", "seed": 1}\'')
    gen.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the images")
    args = parser.parse_args(argv)
    setup_logging()

    from .engine import Engine

    try:
        request = parse_request(json.loads(args.request))
        result = Engine().generate(request)
    except (SDError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for image in result.images:
        path = args.out / f"{result.model}-{image.seed}.{image.extension}"
        path.write_bytes(image.data)
        print(f"wrote {path} ({image.width}x{image.height}, seed {image.seed})")
    print(json.dumps({"seeds": result.seeds, "timings": {k: round(v, 3) for k, v in result.timings.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
