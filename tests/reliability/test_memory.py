"""Memory faults: a request over the pixel budget is refused up front; a REAL allocation failure during generation
(a worker process under an address-space limit) becomes OutOfMemory, and the same worker then serves normally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest

REPO = Path(__file__).resolve().parents[2]

# Runs in its own process: RLIMIT_AS must not touch the test runner. No code hook: torch's own allocator fails.
WORKER = textwrap.dedent("""
    import base64, io, json, resource, sys
    import numpy as np
    from PIL import Image
    from sd_core.engine import Engine
    from sd_core.errors import OutOfMemory
    from sd_core.schema import GenerationRequest
    from sd_core.settings import Settings

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    def request(**fields):
        return GenerationRequest(**{"prompt": "a red fox", "seed": 11, "num_inference_steps": 2, **fields})

    engine = Engine(Settings.from_env())
    first = engine.generate(request())
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1536, 1536, 3)).astype(np.uint8)).save(buffer, "PNG")
    big = request(image=base64.b64encode(buffer.getvalue()).decode(), strength=0.5)  # VAE-encodes 1536x1536 first
    base = vm_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (base + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
    out = {"errors": []}
    for _ in range(2):  # repeated failures must not leak what they allocated
        try:
            engine.generate(big)
            out["errors"].append("succeeded")
        except OutOfMemory as exc:
            out["errors"].append("OutOfMemory: " + str(exc))
        except BaseException as exc:
            out["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
    after = engine.generate(request())  # still under the same limit
    out["same_image_after"] = after.images[0].data == first.images[0].data
    out["vm_growth_mb"] = (vm_bytes() - base) // 2**20
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # CI proves the same through the RunPod worker (tests/reliability/test_servers.py)
def test_real_allocation_failure_is_out_of_memory_and_the_worker_recovers(engine_settings, tiny_bucket,
                                                                           reliability_tally):
    env = {**os.environ, "SD_WEIGHTS_URI": str(tiny_bucket), "SD_CACHE_DIR": str(engine_settings.cache_dir),
           "SD_DEVICE": "cpu", "SD_DTYPE": "float32", "SD_MODELS_DIR": str(REPO / "models"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WORKER, "256"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["errors"] == ["OutOfMemory: num_outputs: ran out of memory during generation; try fewer or smaller "
                             "images"] * 2, out
    assert out["same_image_after"], out
    reliability_tally["memory faults injected"] += 2
    reliability_tally["memory faults survived"] += 2


def test_request_over_the_pixel_budget_is_refused_before_any_work(make_engine):
    engine = make_engine(max_pixels=64 * 64 * 2)
    with pytest.raises(InvalidRequest) as info:
        engine.generate(GenerationRequest(prompt="x", seed=1, num_outputs=3, num_inference_steps=2))
    message = str(info.value)
    assert message.startswith("num_outputs:") and "SD_MAX_PIXELS" in message and "8192" in message, message
    result = engine.generate(GenerationRequest(prompt="x", seed=1, num_outputs=2, num_inference_steps=2))
    assert len(result.images) == 2
