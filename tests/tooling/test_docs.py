"""Generated docs are current: docs/configuration.md is Settings, field for field."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from sd_core.settings import Settings, configuration_markdown, env_name

REPO = Path(__file__).resolve().parents[2]


def test_configuration_page_is_generated_from_settings():
    result = subprocess.run([sys.executable, "scripts/checks/write_config_docs.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_setting_is_documented_once():
    page = configuration_markdown()
    for f in fields(Settings):
        assert f.metadata.get("doc") and f.metadata.get("shown"), f"{f.name}: no doc/shown in its setting()"
        assert page.count(f"| `{env_name(f.name)}` |") == 1, env_name(f.name)
