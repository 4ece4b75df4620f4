"""Content-addressed media store and frame reading.

Images and videos travel between stages by reference, ``sha256:<hex>``, never inline. The store
keeps each file once under its SHA-256 with a small JSON sidecar (kind, media type, original name).
:class:`MediaReader` decodes frames from a stored file or an allowed local path, enforcing size,
frame-count and resolution limits, and turns every decoding failure into a :class:`MediaError`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

from forgeflow.plugins.errors import MediaError, MediaNotFound, MediaTooLarge

# FFmpeg prints its own complaints about corrupt files to stderr; ours are the MediaErrors below.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

REF_PREFIX = "sha256:"
_REF_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_CHUNK = 1024 * 1024
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

    def to_dict(self) -> dict[str, Any]:
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
            while chunk := stream.read(_CHUNK):
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
                while chunk := held.read(_CHUNK):
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


@dataclass(frozen=True)
class Frame:
    index: int
    timestamp_s: float
    image: Any  # numpy.ndarray, HxWx3 BGR uint8


class MediaReader:
    """Decode the frames of one image or video file with limits.

    An image is a one-frame video at timestamp 0. ``frames(stride, max_frames)`` yields every
    ``stride``-th frame up to ``max_frames`` (the tool's own choice) and the host's cap
    (``FORGEFLOW_MAX_FRAMES``, none by default). Nothing is cut silently: ``frames_read`` counts the
    frames yielded, ``frame_count`` is the media's (exact once read to the end), and ``truncated``
    says the host's cap stopped reading before the end.
    """

    def __init__(self, path: Path, *, max_bytes: int, max_frames: int | None, max_pixels: int) -> None:
        self.path = Path(path)
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.frames_read = 0
        self.truncated = False
        if not self.path.is_file():
            raise MediaNotFound(f"media file not found: {self.path}")
        size = self.path.stat().st_size
        if size == 0:
            raise MediaError(f"media file is empty (0 bytes): {self.path.name}")
        if size > max_bytes:
            raise MediaTooLarge(
                f"media file is {size} bytes, over the limit of {max_bytes} (FORGEFLOW_MAX_MEDIA_BYTES)"
            )
        with self.path.open("rb") as fh:
            sniffed = sniff(fh.read(64))
        if sniffed is None:
            raise MediaError(f"unsupported or corrupt media: {self.path.name}")
        if sniffed[0] == "data":
            raise MediaError(f"{self.path.name} is a data file ({sniffed[1]}), not an image or video")
        self.kind: MediaKind = sniffed[0]
        self.media_type = sniffed[1]
        self.fps, self.frame_count, self.width, self.height = self._probe()

    def _probe(self) -> tuple[float, int, int, int]:
        import cv2

        if self.kind == "image":
            image = self._read_image()
            height, width = image.shape[:2]
            self._image = image
            return 0.0, 1, width, height
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise MediaError(f"cannot open video (corrupt or truncated?): {self.path.name}")
            width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        finally:
            cap.release()
        if width <= 0 or height <= 0:
            raise MediaError(f"video has no readable frames: {self.path.name}")
        self._check_resolution(width, height)
        return (fps if fps > 0 else 25.0), count, width, height

    def _check_resolution(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise MediaTooLarge(
                f"frame size {width}x{height} is over the limit of {self.max_pixels} pixels: {self.path.name}"
            )

    def _read_image(self) -> Any:
        import cv2
        import numpy as np

        # Check the header first so a huge image is refused before it is read and decoded; and the file
        # itself, which is read whole: no image within max_pixels takes more than 8 bytes a pixel (RGBA,
        # 16 bits a channel, uncompressed), while the media limit is sized for videos (gigabytes).
        header = _image_size(self.path)
        if header is not None:
            self._check_resolution(*header)
        size = self.path.stat().st_size
        if size > self.max_pixels * 8 + _CHUNK:
            raise MediaTooLarge(
                f"image file is {size} bytes, more than any image of at most {self.max_pixels} pixels "
                f"takes: {self.path.name}"
            )
        data = np.fromfile(str(self.path), dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None or image.size == 0:
            raise MediaError(f"cannot decode image (corrupt or truncated?): {self.path.name}")
        self._check_resolution(image.shape[1], image.shape[0])
        return image

    def _limit(self, max_frames: int | None) -> int | None:
        limits = [n for n in (self.max_frames, max_frames) if n]
        return min(limits) if limits else None

    def expected_frames(self, stride: int = 1, max_frames: int | None = None) -> int | None:
        """How many frames :meth:`frames` will yield, from the container's frame count (None when
        the video does not say). For progress reports: the decoder may find a few more or fewer."""
        if self.kind == "image":
            return 1
        if self.frame_count <= 0:
            return None
        whole = -(-self.frame_count // max(stride, 1))
        limit = self._limit(max_frames)
        return whole if limit is None else min(limit, whole)

    def frames(self, stride: int = 1, max_frames: int | None = None, start: int = 0) -> Iterator[Frame]:
        """Every ``stride``-th frame from ``start`` (the frames before it are skipped without being
        decoded, and count as read: a resumed call read them in its earlier attempt)."""
        import cv2

        if stride < 1:
            raise ValueError("stride must be >= 1")
        limit = self._limit(max_frames)
        if self.kind == "image":
            self.frames_read = max(self.frames_read, 1)
            yield Frame(0, 0.0, self._image)
            return
        cap = cv2.VideoCapture(str(self.path))
        try:
            index = 0
            yielded = 0
            while limit is None or yielded < limit:
                ok = cap.grab()
                if not ok:
                    self.frame_count = index  # read to the end: the exact count, whatever the header said
                    break
                if index % stride == 0 and index < start:
                    yielded += 1
                    self.frames_read = max(self.frames_read, yielded)
                elif index % stride == 0:
                    ok, image = cap.retrieve()
                    if not ok or image is None:
                        raise MediaError(f"cannot decode frame {index} of {self.path.name} (corrupt video?)")
                    yielded += 1
                    self.frames_read = max(self.frames_read, yielded)
                    yield Frame(index, round(index / self.fps, 6), image)
                index += 1
            else:
                # stopped by a limit: the host's cap is a cut to report when the media goes on
                if self.max_frames is not None and yielded >= self.max_frames and cap.grab():
                    self.truncated = True
            if index == 0:
                raise MediaError(f"video has no readable frames (corrupt or truncated?): {self.path.name}")
        finally:
            cap.release()


class FrameSeeker:
    """Frames of one video by index, in increasing order, decoding only those asked for (``grab``
    skips the rest): for a stage that follows another stage's frames as they stream in."""

    def __init__(self, reader: MediaReader) -> None:
        import cv2

        self._reader = reader
        self._cap = cv2.VideoCapture(str(reader.path)) if reader.kind == "video" else None
        self._next = 0  # index of the frame the next grab() reads
        self.covered = 0

    def frame(self, index: int) -> Frame | None:
        """Frame ``index`` (None when the media ends before it); indices must not go back."""
        reader = self._reader
        if self._cap is None:  # an image: its one frame
            return Frame(0, 0.0, reader._image) if index == 0 else None
        if index < self._next - 1:
            raise MediaError(f"frame {index} asked for after frame {self._next - 1}: frames must come in order")
        while self._next <= index:
            if not self._cap.grab():
                return None
            self._next += 1
        ok, image = self._cap.retrieve()
        if not ok or image is None:
            raise MediaError(f"cannot decode frame {index} of {reader.path.name} (corrupt video?)")
        return Frame(index, round(index / reader.fps, 6), image)

    def covers(self, count: int = 1) -> None:
        """``count`` more frames of the media were analysed (decoded here or not: a reused result counts)."""
        self.covered += count
        self._reader.frames_read = max(self._reader.frames_read, self.covered)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> FrameSeeker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _image_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG or JPEG header, without decoding the pixels."""
    import struct

    with path.open("rb") as fh:
        head = fh.read(26)
        if head.startswith(b"\x89PNG") and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return width, height
        if head.startswith(b"\xff\xd8"):
            fh.seek(2)
            while True:
                marker = fh.read(2)
                if len(marker) < 2 or marker[0] != 0xFF:
                    return None
                if marker[1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                    seg = fh.read(7)
                    if len(seg) < 7:
                        return None
                    height, width = struct.unpack(">HH", seg[3:7])
                    return width, height
                length_bytes = fh.read(2)
                if len(length_bytes) < 2:
                    return None
                fh.seek(struct.unpack(">H", length_bytes)[0] - 2, os.SEEK_CUR)
    return None
