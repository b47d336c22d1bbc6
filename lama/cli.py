"""`lama`: the command line, composed from the host and the device command sets.

    lama train smollm2-135m --out runs/smol/ckpt      # host (exporter/cli.py; needs the export extra)
    lama calibrate runs/smol/ckpt --target 0.95
    lama export runs/smol/ckpt --out runs/smol/onnx
    lama generate runs/smol/onnx "Once upon a time"   # device (runtime/cli.py; base install)
    lama chat runs/smol/onnx
    lama inspect runs/smol/onnx

The device commands come from `runtime.cli`, the host commands from `exporter.cli`; neither
imports the other. On a device without the host dependencies (torch, transformers, onnx) the
host commands are still listed in `lama --help`, and running one says what to install instead
of failing on an import. Imports are deferred to each command, so `lama --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from exporter.cli import HOST_COMMANDS, add_host_commands
from runtime.cli import add_device_commands, run_command, version

HOST_DEPS = ("torch", "transformers", "onnx")


def missing_host_deps() -> list[str]:
    return [m for m in HOST_DEPS if importlib.util.find_spec(m) is None]


def _host_missing(a: argparse.Namespace) -> None:
    raise SystemExit(f"lama {a.command}: this needs the host install ({', '.join(a.missing)} missing here): "
                     f"pip install 'lama-ee[export]'. A device only needs generate, chat and inspect.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lama", description="Self-supervised early exits for LLMs, exported per segment.")
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="command", required=True)
    missing = missing_host_deps()
    if not missing:
        add_host_commands(sub)
    else:  # listed, so `lama --help` shows them, but they only explain what to install
        for name, help_text in HOST_COMMANDS.items():
            h = sub.add_parser(name, help=f"{help_text} (host install only)", add_help=False)
            h.add_argument("rest", nargs=argparse.REMAINDER)
            h.set_defaults(func=_host_missing, missing=missing)
    add_device_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
