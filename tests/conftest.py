"""Test-wide setup: offline hub, and the fixture modules under tests/fixtures."""

import os

# Set before anything imports huggingface_hub/diffusers: a hidden hub call must fail, never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.tiny_models",
    "tests.fixtures.engine",
    "tests.fixtures.cog_server",
    "tests.fixtures.s3",
    "tests.fixtures.fault_proxy",
    "tests.fixtures.runpod_server",
]
