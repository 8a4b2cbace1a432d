"""Development tools the tests, benchmarks and scripts import (never part of an image)."""
