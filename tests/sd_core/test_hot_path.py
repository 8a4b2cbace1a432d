"""The lean hot path: no idle batch wait for a lone request, per-image results in order, light imports."""

import subprocess
import sys
import threading
from pathlib import Path

from sd_core.outputs import read_parameters
from sd_core.schema import GenerationRequest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "peft", "boto3", "numpy", "scipy")


def test_a_lone_request_does_not_sit_out_the_batch_window(make_engine):
    # A batch window of a minute: only requests that are on their way may hold a batch back, a lone one starts at once.
    engine = make_engine(max_batch_images=8, batch_wait_ms=60_000)
    result = engine.generate(GenerationRequest(prompt="a red fox", seed=3))
    assert result.timings["queue_s"] < 30, result.timings
    assert {"prepare_s", "queue_s", "inference_s", "encode_s", "total_s"} <= set(result.timings)


def test_requests_being_prepared_still_join_the_batch(make_engine):
    engine = make_engine(max_batch_images=8, batch_wait_ms=60_000)
    barrier = threading.Barrier(3)
    results = []

    def client(i):
        barrier.wait()
        results.append(engine.generate(GenerationRequest(prompt=f"prompt {i}", seed=i)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 3
    assert all(r.timings["queue_s"] < 30 for r in results), [r.timings for r in results]  # nobody waited it out
    assert max(r.timings["batch_size"] for r in results) > 1


def test_images_of_one_request_keep_their_order_seeds_and_infotext(engine):
    result = engine.generate(GenerationRequest(prompt="a blue whale", seed=41, num_outputs=4))
    assert [image.seed for image in result.images] == result.seeds == [41, 42, 43, 44]
    for image in result.images:
        assert f"Seed: {image.seed}," in read_parameters(image.data)
    assert len({image.data for image in result.images}) == 4


def test_importing_sd_core_and_the_adapters_pulls_in_no_heavy_library():
    # torch/diffusers (seconds) load only when the engine is created; the adapters' imports must stay light.
    code = (
        "import sys\n"
        "import sd_core, sd_core.schema, sd_core.settings, sd_core.errors\n"
        "import predict, handler\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
