"""The `lama` program: one command line over both sides of LAMA.

`lama/cli.py` composes the host commands (train, calibrate, export: `exporter/cli.py`, which
needs the `export` extra) and the device commands (generate, chat, inspect: `runtime/cli.py`,
base install). Each side's command set knows nothing of the other; only this package imports
both. `python -m lama ...` runs the same program as the `lama` script.
"""
