"""Media between hosts that share nothing but the API (and Prefect).

A flow run on a worker host (``FORGEFLOW_API_URL`` set) has its own ``FORGEFLOW_HOME``, so its
media store lacks what was uploaded to the API. Before a stage runs, :meth:`MediaSync.fetch` takes
every media ref in the stage's inputs (the job's ``input.media`` among them) that this host's store
lacks, downloads it from ``GET /v1/media/{ref}/content``, checks that the bytes hash to the ref and
stores it: later stages and later jobs of the host find it there and download nothing. After the
stage, :meth:`MediaSync.upload` sends every ref in its outputs that the API lacks (media the tool
stored with ``ctx.put_media``: an annotated video) to ``POST /v1/media``, so the API can serve
every ref of a result.

Every failure is a :class:`~forgeflow.plugins.errors.MediaError` naming the ref and the API: the
API unreachable or too slow (every request has a timeout, nothing waits forever), a ref it does
not have (:class:`~forgeflow.plugins.errors.MediaNotFound`), bytes that do not hash to the ref
(:class:`~forgeflow.plugins.media.MediaDigestMismatch`).

A download streams (memory holds one chunk, whatever the size: a match is gigabytes) into a partial
file named after the ref (:meth:`MediaStore.resumable_writer`), which becomes part of the store only
once complete and verified against the ref's SHA-256. When the connection breaks after bytes came, the
download continues with ``Range: bytes=<have>-`` (up to ``max_resumes`` times); a partial file that a
killed or failed run left is continued the same way by the next fetch. An API that answers the whole
file instead (200) is read from the start again. Uploads stream the stored file the same way.

The requests carry ``Authorization: Bearer <FORGEFLOW_INGEST_TOKEN>`` (the worker host's token,
which the media routes take besides the API token), else the API token. Without
``FORGEFLOW_API_URL`` (embedded mode) there is no MediaSync and nothing changes.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from email.message import Message

import httpx

from forgeflow.plugins.errors import MediaError, MediaNotFound, MediaTooLarge
from forgeflow.plugins.frames import FRAMES_KEY, FramesDescriptor, chunk_refs, is_frames
from forgeflow.plugins.media import REF_PREFIX, MediaDigestMismatch, MediaStore, MediaWriter
from forgeflow.settings import MATCH_MEDIA_BYTES, Settings
from forgeflow.tls import tls_context

MEDIA_PATH = "/v1/media"
_REF_RE = re.compile(rf"^{REF_PREFIX}[0-9a-f]{{64}}$")
_REF_LENGTH = len(REF_PREFIX) + 64
CONNECT_TIMEOUT_S = 5.0
#: Longest wait for any one read or write of a transfer (a stalled API fails the stage, never hangs it).
IO_TIMEOUT_S = 30.0
#: Times one download continues after its connection broke mid-way (each resumed try must bring bytes).
MAX_RESUMES = 5

log = logging.getLogger(__name__)


class MediaSyncError(MediaError):
    """The API could not be reached, or refused a media transfer."""

    error_type = "MediaSyncError"


@dataclass
class MediaSyncStats:
    """What a :class:`MediaSync` did so far (for logs, ``forgeflow engine status`` and tests)."""

    downloads: int = 0
    #: Bytes received from the API (a resumed download counts only what it fetched itself).
    downloaded_bytes: int = 0
    #: Range requests that continued earlier bytes of a download (after a broken connection, or from
    #: the partial file a killed or failed run left).
    resumes: int = 0
    uploads: int = 0
    uploaded_bytes: int = 0
    #: Refs a stage read that were already in this host's store (no download).
    local_hits: int = 0
    #: Refs a stage made that the API already had (no upload).
    remote_hits: int = 0


def media_refs(value: object) -> list[str]:
    """Every media ref (``sha256:`` and 64 hex digits, the whole string) in a JSON value, in order, once."""
    found: dict[str, None] = {}
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) == _REF_LENGTH and _REF_RE.match(item):
                found[item] = None
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return list(found)


def _frames_values(value: object) -> list[FramesDescriptor]:
    """The per-frame artifact descriptors among a stage's input or output values."""
    if not isinstance(value, dict):
        return []
    return [v for v in value.values() if is_frames(v)]


class MediaSync:
    """Keeps this host's media store and the API's in step for the stages of the jobs it runs."""

    def __init__(
        self,
        api_url: str,
        store: MediaStore,
        token: str | None = None,
        *,
        max_bytes: int = MATCH_MEDIA_BYTES,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        io_timeout_s: float = IO_TIMEOUT_S,
        max_resumes: int = MAX_RESUMES,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.store = store
        self.max_bytes = max_bytes
        self.max_resumes = max_resumes
        self.stats = MediaSyncStats()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(io_timeout_s, connect=connect_timeout_s)
        self._client = httpx.Client(base_url=self.api_url, headers=headers, timeout=timeout, verify=tls_context())
        self._lock = threading.Lock()
        self._ref_locks: dict[str, threading.Lock] = {}
        self._on_api: set[str] = set()  # refs the API is known to hold

    @classmethod
    def from_settings(cls, settings: Settings) -> MediaSync | None:
        """A MediaSync to ``settings.api_url`` with the ingest token (else the API token), or None
        without an API URL (embedded mode: nothing to sync)."""
        if not settings.api_url:
            return None
        secret = settings.ingest_token or settings.api_token
        token = secret.get_secret_value() if secret is not None else None
        return cls(settings.api_url, MediaStore(settings.media_root), token, max_bytes=settings.max_media_bytes)

    # --- before a stage -------------------------------------------------------------------------
    def fetch(self, value: object) -> list[str]:
        """Download every media ref in ``value`` (a stage's inputs) that this host's store lacks;
        returns the refs downloaded. Raises a MediaError naming the ref and the API."""
        fetched = []
        for ref in media_refs(value):
            with self._ref_lock(ref):
                if self.store.has(ref):
                    self._count(local_hits=1)
                    continue
                self._download(ref)
                fetched.append(ref)
        # a per-frame artifact's ref names its manifest: its chunks come after it
        chunks = [chunk_refs(self.store, v) for v in _frames_values(value)]
        if chunks:
            fetched += self.fetch(chunks)
        return fetched

    def _download(self, ref: str) -> None:
        url = f"{self.api_url}{MEDIA_PATH}/{ref}/content"
        try:
            with self.store.resumable_writer(ref, max_bytes=self.max_bytes) as partial:
                if self.store.has(ref):  # another process of this host fetched it while this one waited
                    partial.discard()
                    self._count(local_hits=1)
                    return
                received, resumes, filename = self._receive(ref, url, partial)
                info = partial.commit(filename)
        except MediaDigestMismatch as exc:
            raise MediaDigestMismatch(
                f"media {ref} fetched from {url} does not match its digest: {exc.message}; nothing was stored"
            ) from None
        except MediaTooLarge as exc:
            raise MediaTooLarge(
                f"media {ref} fetched from {url}: {exc.message} (FORGEFLOW_MAX_MEDIA_BYTES); nothing was stored"
            ) from None
        except httpx.HTTPError as exc:
            raise MediaSyncError(f"cannot fetch media {ref} from the API at {self.api_url}: {_describe(exc)}") from None
        self._count(downloads=1, downloaded_bytes=received, resumes=resumes)
        log.debug("fetched %s (%d bytes, %d received, %d resumes)", ref, info.size_bytes, received, resumes)
        with self._lock:
            self._on_api.add(ref)

    def _receive(self, ref: str, url: str, partial: MediaWriter) -> tuple[int, int, str | None]:
        """Stream the bytes of ``ref`` into ``partial``, continuing what it holds with a ``Range``
        request; a connection that breaks after bytes came is resumed the same way, at most
        ``max_resumes`` times. Returns (bytes received, resumes, the file's name)."""
        etag = f'"{ref.removeprefix(REF_PREFIX)}"'
        received = resumes = breaks = 0
        filename: str | None = None
        while True:
            # Identity: a Range counts the bytes of the file itself, which are what the ref hashes.
            headers = {"Accept-Encoding": "identity"}
            if partial.size:
                # If-Range: should the API hold other bytes under this name, it answers 200 with all of them.
                headers |= {"Range": f"bytes={partial.size}-", "If-Range": etag}
            got = 0
            try:
                with self._client.stream("GET", f"{MEDIA_PATH}/{ref}/content", headers=headers) as response:
                    if response.status_code == 416 and partial.size:
                        if partial.complete:  # the earlier try had every byte; it stopped before storing
                            return received, resumes, filename
                        partial.restart()
                        continue
                    if response.status_code == 404:
                        partial.discard()
                        raise MediaNotFound(
                            f"media {ref} is not in this host's media store and the API at {self.api_url} does "
                            f"not have it (404 from {url})"
                        )
                    if response.status_code not in (200, 206):
                        response.read()
                        raise MediaSyncError(f"cannot fetch media {ref} from {url}: {_refusal(response)}")
                    if response.status_code == 206 and _range_start(response) != partial.size:
                        raise MediaSyncError(
                            f"cannot fetch media {ref} from {url}: asked for bytes from {partial.size}, got "
                            f"{response.headers.get('content-range')!r}"
                        )
                    if response.status_code == 200 and partial.size:
                        partial.restart()  # the API sent the whole file after all: take it from the start
                    if partial.size:
                        resumes += 1
                    filename = _filename(response.headers.get("content-disposition")) or filename
                    total = _total_size(response)
                    if total is not None and total > self.max_bytes:
                        partial.discard()
                        raise MediaTooLarge(f"media is {total} bytes, over the limit of {self.max_bytes} bytes")
                    for chunk in response.iter_bytes():
                        partial.write(chunk)
                        got += len(chunk)
                received += got
                return received, resumes, filename
            except httpx.TransportError as exc:
                received += got
                breaks += 1
                if got == 0 or breaks > self.max_resumes:
                    kept = f"; the {partial.size} bytes received are kept for the next try" if partial.size else ""
                    raise MediaSyncError(
                        f"cannot fetch media {ref} from the API at {self.api_url}: {_describe(exc)}{kept}"
                    ) from None
                log.info("fetching %s broke after %d bytes (%s); resuming", ref, partial.size, _describe(exc))

    # --- after a stage --------------------------------------------------------------------------
    def upload(self, value: object) -> list[str]:
        """Send every media ref in ``value`` (a stage's outputs) that is in this host's store and not
        on the API to ``POST /v1/media``; returns the refs uploaded. Refs this host lacks are not
        media it made and are left alone."""
        uploaded = []
        # a per-frame artifact's chunks go before its manifest, so the API never names a missing chunk
        chunks = [
            chunk_refs(self.store, v)
            for v in _frames_values(value)
            if isinstance(ref := v[FRAMES_KEY], str) and self.store.has(ref)  # (a descriptor's ref is text)
        ]
        if chunks:
            uploaded += self.upload(chunks)
        for ref in media_refs(value):
            with self._ref_lock(ref):
                with self._lock:
                    known = ref in self._on_api
                if known or not self.store.has(ref):
                    continue
                if self._api_has(ref):
                    self._count(remote_hits=1)
                else:
                    self._upload(ref)
                    uploaded.append(ref)
                with self._lock:
                    self._on_api.add(ref)
        return uploaded

    def _api_has(self, ref: str) -> bool:
        try:
            response = self._client.get(f"{MEDIA_PATH}/{ref}")
        except httpx.HTTPError as exc:
            raise MediaSyncError(f"cannot upload media {ref} to the API at {self.api_url}: {_describe(exc)}") from None
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise MediaSyncError(
            f"cannot upload media {ref} to the API at {self.api_url} (GET {MEDIA_PATH}/{ref}): {_refusal(response)}"
        )

    def _upload(self, ref: str) -> None:
        info = self.store.info(ref)
        headers = {"Content-Type": "application/octet-stream"}
        if info.filename and info.filename.isascii() and info.filename.isprintable():
            headers["X-Filename"] = info.filename
        try:
            with self.store.path(ref).open("rb") as fh:
                response = self._client.post(MEDIA_PATH, content=fh, headers=headers)
        except httpx.HTTPError as exc:
            raise MediaSyncError(f"cannot upload media {ref} to the API at {self.api_url}: {_describe(exc)}") from None
        if response.status_code != 201:
            raise MediaSyncError(
                f"cannot upload media {ref} to the API at {self.api_url} (POST {MEDIA_PATH}): {_refusal(response)}"
            )
        stored = response.json().get("ref")
        if stored != ref:
            raise MediaDigestMismatch(f"media {ref} uploaded to the API at {self.api_url} was stored as {stored}")
        self._count(uploads=1, uploaded_bytes=info.size_bytes)

    # --- plumbing ---------------------------------------------------------------------------------
    def _ref_lock(self, ref: str) -> threading.Lock:
        with self._lock:
            return self._ref_locks.setdefault(ref, threading.Lock())

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self.stats, name, getattr(self.stats, name) + amount)

    def close(self) -> None:
        self._client.close()


def _range_start(response: httpx.Response) -> int | None:
    """Where the bytes of a 206 answer start (``Content-Range: bytes <start>-<end>/<size>``)."""
    match = re.match(r"^bytes (\d+)-\d+/(\d+|\*)$", response.headers.get("content-range", ""))
    return int(match.group(1)) if match else None


def _total_size(response: httpx.Response) -> int | None:
    """The whole file's size as an answer gives it (Content-Range of a 206, else Content-Length)."""
    match = re.match(r"^bytes \d+-\d+/(\d+)$", response.headers.get("content-range", ""))
    if match:
        return int(match.group(1))
    length = response.headers.get("content-length", "")
    return int(length) if response.status_code == 200 and length.isdigit() else None


def _filename(disposition: str | None) -> str | None:
    if not disposition:
        return None
    message = Message()
    message["content-disposition"] = disposition
    name = message.get_filename()
    return str(name) if name else None


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"unreachable ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _refusal(response: httpx.Response) -> str:
    try:
        body = response.json()
        detail = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        detail = None
    detail = detail or response.text[:200] or response.reason_phrase
    hint = ""
    if response.status_code == 401:
        hint = " (set FORGEFLOW_INGEST_TOKEN on this host to the API's ingest token)"
    return f"{response.status_code} {detail}{hint}"
