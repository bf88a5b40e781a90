"""Benchmarks: `python -m bench.<name>` prints one JSON line per measured case (blueprint section 4)."""
