"""The cache root (`$QUANTSCALE_CACHE`, default `~/.cache/quantscale`), a per-asset lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: `$QUANTSCALE_CACHE`, else `~/.cache/quantscale` (created)."""
    root = Path(os.environ.get("QUANTSCALE_CACHE") or Path.home() / ".cache" / "quantscale")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive file lock under the cache so that one process builds an asset."""
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
