"""Model upscaler memory: peak RSS of a x4 upscale tiled (SD_UPSCALER_TILE) vs untiled, side by side.

    python -m scripts.bench.upscale [--size 1024] [--tile 192] [--overlap 16]

Each variant runs in its own process (the tiny random-weight ESRGAN x4 twin on the CPU, built offline), so each peak
resident set size is its own; the figure is untiled / tiled. Not in `python -m scripts.bench all` yet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from devtools.tiny_upscaler import write_tiny_upscalers
from sd_core.device import choose_placement
from sd_core.settings import REPO_ROOT, Settings
from sd_core.upscalers import Upscalers
size, tile, overlap, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
write_tiny_upscalers(work)
settings = Settings(models_dir=REPO_ROOT / "models", weights_uri=str(work), cache_dir=work / "cache", device="cpu",
                    dtype="float32", upscaler_tile=tile, upscaler_tile_overlap=overlap)
upscalers = Upscalers(settings, choose_placement(settings))
image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
upscalers.upscale("tiny-esrgan-x4", [image], size * 4, size * 4)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "before_mb": before / 1024}))
"""


def measure(size: int, tile: int, overlap: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(tile), str(overlap), work],
                             check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="input side (default 1024: a 4096x4096 output)")
    parser.add_argument("--tile", type=int, default=192)
    parser.add_argument("--overlap", type=int, default=16)
    args = parser.parse_args(argv)
    tiled, whole = measure(args.size, args.tile, args.overlap), measure(args.size, 0, 0)
    print(f"x4 upscale of {args.size}x{args.size} (tiny ESRGAN, CPU)   tiled {args.tile}+{args.overlap}   untiled")
    print(f"peak RSS, MB                                  {tiled['peak_mb']:>10.0f}   {whole['peak_mb']:>8.0f}")
    print(f"seconds                                       {tiled['seconds']:>10.2f}   {whole['seconds']:>8.2f}")
    print(f"untiled / tiled peak memory: {whole['peak_mb'] / tiled['peak_mb']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
