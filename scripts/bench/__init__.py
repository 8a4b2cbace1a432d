"""The benchmark suite: `python -m scripts.bench ...` (see __main__.py); one module per benchmark."""
