#!/usr/bin/env python
"""Write docs/configuration.md from sd_core.settings.Settings (every variable, default and meaning).

    python scripts/checks/write_config_docs.py            # (re)write docs/configuration.md
    python scripts/checks/write_config_docs.py --check    # exit 1 if it no longer matches Settings
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from scripts.checks.generated_file import main  # noqa: E402
from sd_core.settings import configuration_markdown  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(REPO_ROOT / "docs" / "configuration.md", configuration_markdown,
                  "python scripts/checks/write_config_docs.py"))
