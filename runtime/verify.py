"""Check an export folder before opening anything: every file the manifest lists (graphs, their
external weights, tokenizer files) is present, with the listed size and sha256. Tokenizer files of
manifests before schema 3 carry no size or sha256: they are checked for presence only."""

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
    """ManifestError unless every file `manifest` lists is in `folder` as listed (`checksums`:
    its sha256 too). The manifest's own structure was checked when it was read (Manifest.load)."""
    graphs = [(f"segment {seg.index} file {seg.file}", seg) for seg in manifest.segments]
    graphs += [(f"exit head graph {head.file}", head) for head in manifest.heads]
    graphs += [(f"K/V fill graph {seg.kv_fill.file}", seg.kv_fill) for seg in manifest.segments if seg.kv_fill]
    files = []
    for what, graph in graphs:
        # the graph and every file it reads beside it (external weights): all listed, all checked
        files += [(what, graph.file, graph.sha256, graph.size)]
        files += [(f"{what}: its weights file {d.file}", d.file, d.sha256, d.size) for d in graph.data_files]
    files += [(f"tokenizer file {f.file}", f.file, f.sha256, f.size) for f in manifest.tokenizer.files]
    if manifest.ngram is not None:
        files.append((f"n-gram draft table {manifest.ngram.file}", manifest.ngram.file, manifest.ngram.sha256,
                      manifest.ngram.size))
    for name, file, digest, size in files:
        path = folder / file
        if not path.is_file():
            raise ManifestError(f"{folder}: {name} is missing")
        if size is not None and path.stat().st_size != size:
            raise ManifestError(f"{folder}: {name} is {path.stat().st_size} bytes, the manifest says {size} "
                                f"(truncated, modified after export, or exported by an older exporter)")
        if checksums and digest is not None and sha256(path) != digest:
            raise ManifestError(f"{folder}: {name} does not match its sha256 in the manifest "
                                f"(corrupted or modified after export)")
    if not (folder / "tokenizer.json").is_file():
        raise ManifestError(f"{folder}: tokenizer.json is missing")
