"""Command-line scripts by purpose: ops/ (operations), checks/ (generated files), bench/ (benchmarks)."""
