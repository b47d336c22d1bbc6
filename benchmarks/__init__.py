"""LAMA's benchmarks: the harness that compares LAMA with other runtimes (top level) and the one-off
studies behind the design's choices (`benchmarks.studies`). Every script runs as a module from the
repository root, e.g. `python -m benchmarks.run --help`; see benchmarks/README.md."""
