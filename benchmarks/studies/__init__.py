"""One-off studies behind LAMA's design choices (KV layout, thread pools, quantization schemes,
deferral bound, exit checks, gate features, training size, per-domain calibration, budgets,
profiling, lookahead heads, KV recycling, the GPU backends). Each runs as a module from the
repository root, e.g. `python -m benchmarks.studies.domains --help`; their committed results stay
under benchmarks/results/. The harness that compares LAMA with other runtimes is one level up."""
