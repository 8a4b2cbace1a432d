#!/usr/bin/env python
"""Pre-fill the weights cache (e.g. a RunPod network volume) for the named models, through the worker's own fetch path.

    SD_CACHE_DIR=/runpod-volume/sd-cache python scripts/ops/warm_cache.py sd15 sdxl   # these models (+ their LoRAs)
    python scripts/ops/warm_cache.py                                                  # SD_PRELOAD_MODELS / default
    python scripts/ops/warm_cache.py --all                                            # every manifest in SD_MODELS_DIR

Configuration is the worker's (SD_MODELS_DIR, SD_WEIGHTS_URI, SD_CACHE_DIR, SD_CACHE_MAX_GB, AWS_* ...). Several
instances may run at once against a shared volume: the cache's file locks make each object download once.
Exit status 1 when any model failed (each failure is printed, the others still warm).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sd_core import storage  # noqa: E402
from sd_core.errors import SDError  # noqa: E402
from sd_core.manifests import ModelCatalog, fetch_model, resolve_uri  # noqa: E402
from sd_core.settings import Settings  # noqa: E402

log = logging.getLogger("sd_core.warm_cache")


def warm(names: list[str], settings: Settings, *, loras: bool = True) -> dict[str, dict]:
    """Fetch each model (and its LoRAs) into the cache. Returns {name: {"seconds", "weights", ...} or {"error"}}."""
    catalog = ModelCatalog.from_settings(settings)
    report: dict[str, dict] = {}
    for name in names:
        t0 = time.monotonic()
        try:
            manifest = catalog.get(name)
            local = fetch_model(manifest, settings)
            item = {"weights": str(local.weights), "config": str(local.config) if local.config else None}
            if loras:
                item["loras"] = {
                    lora.name: str(storage.fetch(resolve_uri(lora.uri, settings), settings, sha256=lora.sha256,
                                                 size=lora.size))
                    for lora in manifest.loras
                }
            item["seconds"] = round(time.monotonic() - t0, 3)
        except SDError as exc:
            log.error("cannot warm %s: %s", name, exc)
            item = {"error": str(exc)}
        report[name] = item
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="model names (default: SD_PRELOAD_MODELS or SD_DEFAULT_MODEL)")
    parser.add_argument("--all", action="store_true", help="every manifest in SD_MODELS_DIR")
    parser.add_argument("--no-loras", action="store_true", help="skip the LoRAs the manifests list")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    try:
        names = sorted(ModelCatalog.from_dir(settings.models_dir).manifests) if args.all else (
            args.models or list(settings.models_to_preload))
    except SDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = warm(names, settings, loras=not args.no_loras)
    print(json.dumps(report, indent=1))
    return 1 if any("error" in item for item in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
