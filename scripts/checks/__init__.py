"""Generated files: write them, or check (--check) that the committed ones are current."""
