"""Writing a generated file, or checking that the committed one is current (the `--check` of the write_* scripts)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def main(output: Path, render: Callable[[], str], command: str, argv: list[str] | None = None) -> int:
    """(Re)write ``output`` with ``render()``; with ``--check``, exit 1 when the file on disk differs instead."""
    parser = argparse.ArgumentParser(description=f"write {output.name}, or check it is current")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {output.name} is stale")
    args = parser.parse_args(argv)
    text = render()
    current = output.read_text() if output.exists() else None
    if args.check:
        if current != text:
            print(f"{output.name} is stale: run `{command}`", file=sys.stderr)
            return 1
        print(f"{output.name} is up to date")
        return 0
    if current != text:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        print(f"wrote {output}")
    return 0
