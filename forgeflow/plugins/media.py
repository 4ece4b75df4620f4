"""Content-addressed media store.

Images and videos travel between stages by reference, ``sha256:<hex>``, never inline. The store
keeps each file once under its SHA-256 with a small JSON sidecar (kind, media type, original name).
Decoding frames from a file, within the host's limits, is :mod:`.media_reader`'s.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from forgeflow.plugins.errors import MediaError, MediaNotFound, MediaTooLarge

if TYPE_CHECKING:
    from forgeflow.canonical import JsonObject

# FFmpeg prints its own complaints about corrupt files to stderr; ours are the MediaErrors below.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

REF_PREFIX = "sha256:"
_REF_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
#: Bytes read or written at a time.
CHUNK_BYTES = 1024 * 1024
#: Folder of the store where resumable downloads gather (:meth:`MediaStore.resumable_writer`).
PARTIAL_DIR = ".partial"

#: ``data``: a columnar file ForgeFlow wrote (a chunk or manifest of a per-frame artifact, Parquet).
MediaKind = Literal["image", "video", "data"]


class MediaDigestMismatch(MediaError):
    """Bytes that were to be stored under a ref do not hash to it (nothing was stored)."""

    error_type = "MediaDigestMismatch"


@dataclass(frozen=True)
class MediaInfo:
    ref: str
    sha256: str
    size_bytes: int
    kind: MediaKind
    media_type: str
    filename: str | None = None

    def to_dict(self) -> JsonObject:
        return asdict(self)


def sniff(head: bytes) -> tuple[MediaKind, str, str] | None:
    """Recognise an image or video container from its first bytes: (kind, media type, extension)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "image/jpeg", ".jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "image/png", ".png"
    if head.startswith(b"BM"):
        return "image", "image/bmp", ".bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "image/webp", ".webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "video/x-msvideo", ".avi"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"qt  ":
            return "video", "video/quicktime", ".mov"
        return "video", "video/mp4", ".mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "video/x-matroska", ".mkv"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", "image/tiff", ".tif"
    if head[:4] == b"PAR1":
        return "data", "application/vnd.apache.parquet", ".parquet"
    return None


class MediaStore:
    """A folder of media files named by their SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _blob(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def _sidecar(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.json"

    def put_bytes(self, data: bytes, filename: str | None = None) -> MediaInfo:
        import io

        return self.put_stream(io.BytesIO(data), filename=filename, max_bytes=len(data) + 1)

    def put_file(self, path: Path, filename: str | None = None, max_bytes: int | None = None) -> MediaInfo:
        path = Path(path)
        if not path.is_file():
            raise MediaNotFound(f"media file not found: {path}")
        with path.open("rb") as fh:
            return self.put_stream(fh, filename=filename or path.name, max_bytes=max_bytes)

    def put_stream(
        self,
        stream: IO[bytes],
        filename: str | None = None,
        max_bytes: int | None = None,
        expected_ref: str | None = None,
    ) -> MediaInfo:
        """Copy a stream into the store, hashing as it goes; refuse it past ``max_bytes``, and with
        :class:`MediaDigestMismatch` when ``expected_ref`` is given and the bytes do not hash to it.
        The bytes land in a temporary file that becomes the blob only once complete and checked: a
        failure (or an exception from ``stream``) leaves nothing in the store."""
        with self.writer(max_bytes=max_bytes, expected_ref=expected_ref) as writer:
            while chunk := stream.read(CHUNK_BYTES):
                writer.write(chunk)
            return writer.commit(filename)

    def writer(self, *, max_bytes: int | None = None, expected_ref: str | None = None) -> MediaWriter:
        """A :class:`MediaWriter` on a new temporary file: for bytes that arrive piece by piece (an
        upload). Use it as a context manager; whatever is not committed is deleted on exit."""
        expected = self._digest(expected_ref) if expected_ref is not None else None
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        return MediaWriter(self, fd, Path(tmp_name), max_bytes=max_bytes, expected=expected, keep=False)

    def partial_path(self, ref: str) -> Path:
        """Where the bytes of ``ref`` gather while :meth:`resumable_writer` receives them."""
        return self.root / PARTIAL_DIR / self._digest(ref)

    def resumable_writer(self, ref: str, *, max_bytes: int | None = None) -> MediaWriter:
        """A :class:`MediaWriter` for the bytes of ``ref`` that survives its process: it appends to
        :meth:`partial_path`, which keeps what an earlier writer (this process or one that was killed)
        received, so a download continues where that one stopped (``writer.size`` bytes are there).
        The writer holds an exclusive lock on the partial file until it closes, so two processes never
        append to it at once; the second one waits, then finds the ref in the store. The partial file
        is deleted once committed, when it turns out wrong (digest, size) and when it is empty."""
        digest = self._digest(ref)
        path = self.partial_path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # like mkstemp: the blob it becomes
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder committed or deleted the file while this one waited: open afresh
        writer = MediaWriter(self, fd, path, max_bytes=max_bytes, expected=digest, keep=True)
        try:
            with open(path, "rb") as held:
                while chunk := held.read(CHUNK_BYTES):
                    writer._take(chunk)
        except MediaTooLarge:
            writer.discard()  # it can never become the blob
            raise
        except BaseException:
            writer.close()
            raise
        os.lseek(fd, writer.size, os.SEEK_SET)
        return writer

    def _commit(self, tmp: Path, hexdigest: str, size: int, head: bytes, filename: str | None) -> MediaInfo:
        if size == 0:
            raise MediaError("media is empty (0 bytes)")
        kind = sniff(head)
        if kind is None:
            raise MediaError(
                "unsupported media: not a known image (JPEG, PNG, BMP, WebP, TIFF) or video (MP4, MOV, AVI, MKV)"
            )
        blob = self._blob(hexdigest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        info = MediaInfo(REF_PREFIX + hexdigest, hexdigest, size, kind[0], kind[1], filename)
        if not blob.exists():
            os.replace(tmp, blob)
        sidecar = self._sidecar(hexdigest)
        if not sidecar.exists():
            _atomic_write(sidecar, json.dumps(info.to_dict()).encode())
        return info

    def info(self, ref: str) -> MediaInfo:
        digest = self._digest(ref)
        sidecar = self._sidecar(digest)
        if not sidecar.exists() or not self._blob(digest).exists():
            raise MediaNotFound(f"unknown media ref {ref!r}")
        return MediaInfo(**json.loads(sidecar.read_text()))

    def has(self, ref: str) -> bool:
        """Whether the store holds ``ref`` (its file and its sidecar); a malformed ref is a MediaError."""
        digest = self._digest(ref)
        return self._blob(digest).is_file() and self._sidecar(digest).is_file()

    def path(self, ref: str) -> Path:
        digest = self._digest(ref)
        blob = self._blob(digest)
        if not blob.exists():
            raise MediaNotFound(f"unknown media ref {ref!r}")
        return blob

    def resolve(self, source: str, input_roots: list[Path] | tuple[Path, ...] = ()) -> Path:
        """A media ref or a local path inside one of ``input_roots`` → the file to read."""
        if not isinstance(source, str) or not source:
            raise MediaError("media must be a media ref ('sha256:...') or a local path")
        if source.startswith(REF_PREFIX):
            return self.path(source)
        candidate = Path(source).expanduser()
        if not candidate.is_absolute():
            raise MediaError(f"media path must be absolute: {source!r}")
        real = candidate.resolve()
        roots = [Path(r).expanduser().resolve() for r in input_roots]
        if not any(real == root or root in real.parents for root in roots):
            allowed = ", ".join(str(r) for r in roots) or "none configured (FORGEFLOW_MEDIA_INPUT_ROOTS)"
            raise MediaError(f"media path {source!r} is outside the allowed media roots: {allowed}")
        if not real.is_file():
            raise MediaNotFound(f"media file not found: {source}")
        return real

    @staticmethod
    def _digest(ref: str) -> str:
        match = _REF_RE.match(ref or "")
        if not match:
            raise MediaError(f"malformed media ref {ref!r}: expected 'sha256:' and 64 hex digits")
        return match.group(1)


class MediaWriter:
    """One file on its way into a :class:`MediaStore`: :meth:`write` appends bytes as they arrive
    (hashed as they go, refused past ``max_bytes``), :meth:`commit` checks them and makes the file a
    blob. Nothing half-written ever appears under a ref. Made by :meth:`MediaStore.writer` (a
    temporary file, deleted unless committed) and :meth:`MediaStore.resumable_writer` (a partial file
    kept for the next try). Memory stays at one chunk whatever the file's size."""

    def __init__(
        self, store: MediaStore, fd: int, path: Path, *, max_bytes: int | None, expected: str | None, keep: bool
    ) -> None:
        self.store = store
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self._fd: int | None = fd
        self._expected = expected
        self._keep = keep
        self._digest = hashlib.sha256()
        self._head = b""

    def _take(self, data: bytes) -> None:
        self.size += len(data)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise MediaTooLarge(f"media is larger than the limit of {self.max_bytes} bytes")
        if len(self._head) < 64:
            self._head += data[: 64 - len(self._head)]
        self._digest.update(data)

    def write(self, data: bytes) -> None:
        """Append ``data``; :class:`MediaTooLarge` once the file would pass ``max_bytes`` (the file is
        then deleted: it can never become a blob)."""
        assert self._fd is not None, "the writer is closed"
        try:
            self._take(data)
        except MediaTooLarge:
            self.discard()
            raise
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def restart(self) -> None:
        """Throw away what the file holds and start it again from byte 0."""
        assert self._fd is not None, "the writer is closed"
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.size = 0
        self._digest = hashlib.sha256()
        self._head = b""

    @property
    def complete(self) -> bool:
        """Whether the bytes so far hash to the expected ref (a resumable writer's file may be whole)."""
        return self._expected is not None and self.size > 0 and self._digest.hexdigest() == self._expected

    def commit(self, filename: str | None = None) -> MediaInfo:
        """Check the bytes (against the expected ref, if any; not empty; a known image or video) and
        make them the store's blob. On any refusal the file is deleted and nothing is stored."""
        assert self._fd is not None, "the writer is closed"
        hexdigest = self._digest.hexdigest()
        try:
            if self._expected is not None and hexdigest != self._expected:
                raise MediaDigestMismatch(
                    f"the bytes given for {REF_PREFIX}{self._expected} ({self.size} bytes) hash to "
                    f"{REF_PREFIX}{hexdigest}"
                )
            os.fsync(self._fd)
            return self.store._commit(self.path, hexdigest, self.size, self._head, filename)
        finally:
            self.discard()  # a committed file is the blob now; this unlinks nothing else under its name

    def discard(self) -> None:
        """Delete the file (whatever it holds) and close the writer."""
        if self._fd is None:
            return
        self._keep = False
        self.close()

    def close(self) -> None:
        """Close the writer: a resumable writer keeps its partial file (unless empty) for the next try;
        a temporary one deletes its file. A committed file is already the blob either way."""
        if self._fd is None:
            return
        try:
            if not (self._keep and self.size > 0) and self._holds_path():
                os.unlink(self.path)
        finally:
            os.close(self._fd)  # releases the partial file's lock
            self._fd = None

    def _holds_path(self) -> bool:
        """Whether :attr:`path` is still this writer's file (not yet renamed into the store)."""
        assert self._fd is not None
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def __enter__(self) -> MediaWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
