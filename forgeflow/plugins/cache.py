"""``ctx.cache``: what a tool computed, kept for the later stages of the same job.

A pipeline often asks for the same expensive work twice: the soccer pipeline's detection stage and
its pose stage both run the pose model on every frame. A tool that can reuse such work declares it
by going through the cache: it builds a key from everything the work depends on (model weights,
device, sizes, the input's content) with :meth:`OutputCache.key`, and calls
:meth:`OutputCache.get_or_compute`. The first stage that needs the value computes and stores it;
a later stage of the same job with the same key reads the stored bytes instead.

Deterministic by construction: the key is a SHA-256 of the canonical JSON of its parts, and the
value is the bytes the computation produced, so a stage gives byte-identical results with the cache
on or off (``FORGEFLOW_REUSE_OUTPUTS=false`` turns it off). The cache is scoped to one job
(``<home>/cache/jobs/<job_id>/``) and removed when the job ends; a call without a job id has no
cache (every ``get`` misses, ``put`` stores nothing).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from forgeflow.canonical import canonical_json

__all__ = ["OutputCache", "file_digest", "job_cache_dir"]


def job_cache_dir(cache_root: Path, job_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)[:200]
    return cache_root / "jobs" / safe


class OutputCache:
    """A content-addressed byte store shared by the stages of one job (``root`` None = off)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @staticmethod
    def key(*parts: object) -> str:
        """SHA-256 of the canonical JSON of ``parts``: equal parts, equal key, in any process."""
        text = canonical_json(parts, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / key

    def get(self, key: str) -> bytes | None:
        if self.root is None:
            return None
        try:
            data = self._path(key).read_bytes()
        except OSError:
            return None
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` (atomically; a cache that cannot be written is simply not used)."""
        if self.root is None:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError:
            self.root = None  # read-only or full: compute everything, never fail the call

    def get_or_compute(self, key: str, compute: Callable[[], bytes]) -> bytes:
        data = self.get(key)
        if data is None:
            self.misses += 1
            data = compute()
            self.put(key, data)
        return data

    def clear(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


_file_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (memoised per process by path, size and mtime)."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _file_digests:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _file_digests[memo] = digest.hexdigest()
    return _file_digests[memo]
