"""Folders written whole or not at all (checkpoints, exports).

Everything goes into a temporary folder beside the destination, which replaces the old
folder only once the block completes: an interrupted or failed write leaves the previous
folder as it was and no half-written one behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing_folder(out: Path, check_old: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` when the block ends without error.
    `check_old(out)` runs before an existing `out` is removed and may raise to keep it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            if check_old is not None:
                check_old(out)
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out)
            else:  # a file (or a link) where the folder goes: check_old let it go
                out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
