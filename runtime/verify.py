"""Check an export folder before opening anything: files present, sizes and checksums match."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .manifest import Manifest, ManifestError


def sha256(path: Path) -> str:
    """Streamed, so multi-GB graphs and engines never sit in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(folder: Path, manifest: Manifest, checksums: bool = True) -> None:
    if not manifest.segments:
        raise ManifestError(f"{folder}: the manifest lists no segments")
    if manifest.segments[-1].exit is not None:
        raise ManifestError(f"{folder}: the last segment must be the model's own head (it has an exit)")
    graphs = [(f"segment {seg.index} file {seg.file}", seg) for seg in manifest.segments]
    graphs += [(f"exit head graph {head.file}", head) for head in manifest.heads]
    for what, graph in graphs:
        path = folder / graph.file
        if not path.is_file():
            raise ManifestError(f"{folder}: {what} is missing")
        if checksums and sha256(path) != graph.sha256:
            raise ManifestError(f"{folder}: {what} does not match its sha256 in the manifest "
                                f"(corrupted or modified after export)")
    if not (folder / "tokenizer.json").is_file():
        raise ManifestError(f"{folder}: tokenizer.json is missing")
