"""The one HTTP client: JSON calls, blob uploads and resumable, sha256-verified downloads.

Two layers of retrying. urllib3's Retry (mounted on the one Session) makes a few quick attempts on
connection errors and 500/502/504 for idempotent methods. Above it, `Client.request` waits out an
orchestrator that is down or busy (connection refused or reset, timeouts, 429, 502/503/504) with capped
exponential backoff and jitter, honours Retry-After, reports each wait through `on_wait`, and stops
waiting the moment `client.stop` is set. 429 and 503 stay out of urllib3's hands because its Retry-After
sleep cannot be interrupted (a SIGTERM would hang). Every POST in protocol v1 is idempotent, so the
upper layer retries POSTs too.

How it waits is patience.py; what it raises is errors.py. The protocol's operations
sit one level up, typed, in api.py. Try it against a running orchestrator:
    python -c "from iota_cli.train.client import Client; print(Client('http://127.0.0.1:8700').get('/v1/health'))"
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from iota_cli import __version__
from iota_cli.core.files import commit
from iota_cli.core.protocol import BLOB_CONTENT_TYPE, PROTOCOL_HEADER, PROTOCOL_VERSION, SHA256_HEADER
from iota_cli.core.urls import resolve
from iota_cli.train.errors import ApiError, IntegrityError, Stopped
from iota_cli.train.partfile import file_lock, hash_file, parse_content_range, restart, verified
from iota_cli.train.patience import Patience

if TYPE_CHECKING:
    import requests

WAIT_STATUSES = frozenset({429, 502, 503, 504})  # wait as long as it takes (or max_wait_s)
S3_MESSAGE = re.compile(r"<Code>([^<]{1,64})</Code>.*?<Message>([^<]{1,200})</Message>", re.DOTALL)
CHUNK = 1 << 16

OnWait = Callable[[str, float], None]  # (message, seconds about to be slept)
OnProgress = Callable[[int, "int | None"], None]  # (bytes so far, total or None)


@dataclass(frozen=True)
class Reply:
    status: int
    data: Any  # parsed JSON, or None (204 or an empty body)
    retry_after: float | None = None  # the server's Retry-After hint, in seconds
    # Case-insensitive (requests' own mapping): servers may send header names in any case, and ASGI
    # servers send them in lower case.
    headers: Mapping[str, str] = field(default_factory=dict)


class Client:
    """HTTP client for one orchestrator; safe to share between the worker and its heartbeat thread."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: tuple[float, float] = (5.0, 60.0),
        max_wait_s: float | None = None,
        on_wait: OnWait | None = None,
        stop: threading.Event | None = None,
        backoff: tuple[float, float] = (1.0, 30.0),
        retries: int = 3,
        retry_backoff: float = 0.25,
        integrity_retries: int = 3,
    ) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.base_url = base_url.rstrip("/") + "/"
        self._origin = _origin(self.base_url)
        self.token = token  # may be set later, after `POST /v1/contributors`
        self.timeout, self.max_wait_s, self.on_wait = timeout, max_wait_s, on_wait
        self.stop = stop or threading.Event()
        self.backoff, self.retries, self.integrity_retries = backoff, retries, integrity_retries
        quick = Retry(
            total=retries, connect=retries, read=retries, status=retries, other=0,
            backoff_factor=retry_backoff, backoff_max=2.0, backoff_jitter=retry_backoff,
            status_forcelist=(500, 502, 504), raise_on_status=False, respect_retry_after_header=False,
        )  # fmt: skip
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"iota-cli/{__version__}"
        self._session.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
        adapter = HTTPAdapter(max_retries=quick, pool_maxsize=8)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def __repr__(self) -> str:  # never show the token
        return f"Client({self.base_url!r}, token={'set' if self.token else None})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def url(self, path_or_url: str) -> str:
        """Resolve a path (or a URL the server handed out) below base_url, keeping its path (core/urls.py)."""
        return resolve(self.base_url, path_or_url)

    # -- JSON calls ------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: tuple[float, float] | None = None,
        wait: bool = True,
    ) -> Reply:
        """Send until the server answers; 2xx -> Reply, 4xx -> ApiError, down/busy -> wait (see module doc).

        wait=False gives up with Unreachable at the first failure that would need waiting.
        """
        patience = Patience(self, wait)
        while True:
            try:
                r = self._send(method, path, json=json, data=data, headers=headers, timeout=timeout)
            except _transient_errors() as e:
                patience.wait(f"{self._who(path)} unreachable ({_describe(e, timeout or self.timeout)})")
                continue
            with r:
                if r.status_code < 400:
                    return Reply(r.status_code, _json(r), _retry_after(r), r.headers)
                status, detail, hint = r.status_code, _detail(r), _retry_after(r)
            if status in WAIT_STATUSES:
                state = "busy" if status == 429 else "unavailable"
                patience.wait(f"{self._who(path)} {state} (HTTP {status})", hint)
            elif status >= 500 and patience.server_errors < self.retries:
                patience.server_errors += 1
                patience.wait(f"{self._who(path)} error (HTTP {status}: {detail})", hint)
            else:
                raise ApiError(status, detail)

    def get(self, path: str, **kw: Any) -> Any:
        """GET path and return the parsed JSON (None on 204)."""
        return self.request("GET", path, **kw).data

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        """POST a JSON body and return the parsed JSON (None on 204; use request() for Retry-After)."""
        return self.request("POST", path, json=body if body is not None else {}, **kw).data

    # -- blobs -----------------------------------------------------------------------------------------

    def upload(self, url: str, data: bytes) -> str:
        """PUT bytes to an upload URL with their sha256 (the server verifies it); return the hex digest."""
        digest = hashlib.sha256(data).hexdigest()
        headers = {SHA256_HEADER: digest, "Content-Type": BLOB_CONTENT_TYPE}
        self.request("PUT", url, data=data, headers=headers)
        return digest

    def download(
        self,
        url: str,
        dest: Path,
        sha256: str,
        size: int | None = None,
        *,
        on_progress: OnProgress | None = None,
    ) -> Path:
        """Fetch url into dest (resuming `<dest>.part` with Range), check sha256; a good dest is a hit."""
        dest = Path(dest)
        if verified(dest, sha256, size):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with file_lock(dest.with_name(dest.name + ".lock"), self.stop) as locked:
            if not locked:
                raise Stopped(f"stopped while another process downloads {dest.name}")
            if verified(dest, sha256, size):  # another process fetched it while we waited for the lock
                return dest
            for failures in range(1, self.integrity_retries + 1):
                hasher = self._fetch(url, part, size, on_progress)
                got, n = hasher.hexdigest(), part.stat().st_size
                if got == sha256 and (size is None or n == size):
                    commit(part, dest)
                    return dest
                part.unlink(missing_ok=True)
                if self.on_wait is not None and failures < self.integrity_retries:
                    self.on_wait(f"{dest.name}: sha256 mismatch ({n} bytes), fetching again", 0.0)
        raise IntegrityError(f"{url}: sha256 mismatch {self.integrity_retries} times (want {sha256})")

    def read_range(self, url: str, offset: int, length: int, sha256: str) -> bytes:
        """Bytes [offset, offset + length) of the blob at url (one Range GET), checked against sha256.

        A server that ignores Range (200) is cut down to the span. Bytes that keep failing their sha256
        (integrity_retries times) raise IntegrityError; waiting for a busy server is as in request().
        """
        if length <= 0:
            if hashlib.sha256(b"").hexdigest() != sha256:
                raise IntegrityError(f"{url}: an empty range cannot hash to {sha256}")
            return b""
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={offset}-{offset + length - 1}"}
        for failures in range(1, self.integrity_retries + 1):
            data = self._range_once(url, headers, offset, length)
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
            if self.on_wait is not None and failures < self.integrity_retries:
                self.on_wait(f"{self._who(url)}: sha256 mismatch on bytes {offset}+{length}, again", 0.0)
        raise IntegrityError(f"{url} bytes {offset}+{length}: sha256 mismatch {self.integrity_retries} times")

    def _range_once(self, url: str, headers: dict[str, str], offset: int, length: int) -> bytes:
        patience = Patience(self, True)
        while True:
            try:
                r = self._send("GET", url, headers=headers)
            except _transient_errors() as e:
                patience.wait(f"{self._who(url)} unreachable ({_describe(e, self.timeout)})")
                continue
            with r:
                status, body = r.status_code, r.content
                span = parse_content_range(r.headers.get("Content-Range"))
                hint = _retry_after(r)
                detail = _detail(r) if status >= 400 else ""
            if status in WAIT_STATUSES or (status >= 500 and patience.server_errors < self.retries):
                patience.server_errors += 0 if status in WAIT_STATUSES else 1
                patience.wait(f"{self._who(url)} answered HTTP {status}", hint)
                continue
            if status >= 400:
                raise ApiError(status, detail)
            if status == 206:
                # Another span than the one asked for hashes wrong below and is fetched again.
                return body if span is not None and span[0] == offset else b""
            return body[offset : offset + length]  # 200: the server ignored Range and sent everything

    def _fetch(self, url: str, part: Path, size: int | None, on_progress: OnProgress | None) -> Any:
        """Bring part up to the whole body (resuming what is there); return its running sha256."""
        hasher, have = hash_file(part)
        if size is not None and have > size:
            hasher, have = restart(part)
        patience = Patience(self, True)
        while True:
            headers = {"Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                r = self._send("GET", url, headers=headers, stream=True)
            except _transient_errors() as e:
                patience.wait(f"{self._who(url)} unreachable ({_describe(e, self.timeout)})")
                continue
            with r:
                status, span = r.status_code, parse_content_range(r.headers.get("Content-Range"))
                total = span[2] if span else None
                if status == 416 and have:  # nothing past `have`: complete when the sizes agree, else stale
                    expected = total if total is not None else size
                    if have and (expected is None or expected == have):
                        return hasher
                    hasher, have = restart(part)
                    continue
                if status >= 400:
                    hint = _retry_after(r)
                    if status in WAIT_STATUSES or (status >= 500 and patience.server_errors < self.retries):
                        patience.server_errors += 0 if status in WAIT_STATUSES else 1
                        patience.wait(f"{self._who(url)} answered HTTP {status}", hint)
                        continue
                    raise ApiError(status, _detail(r))
                if status == 206 and (span is None or span[0] != have):
                    hasher, have = restart(part)  # not the piece we asked for: start clean
                    continue
                if status != 206 and have:
                    hasher, have = restart(part)  # 200 to a Range request: the server sent it all again
                if total is None and r.headers.get("Content-Length", "").isdigit():
                    total = have + int(r.headers["Content-Length"])
                total = size if size is not None else total
                before = have
                try:
                    with open(part, "ab") as f:
                        for chunk in r.iter_content(CHUNK):
                            f.write(chunk)
                            hasher.update(chunk)
                            have += len(chunk)
                            if on_progress is not None:
                                on_progress(have, total)
                except _transient_errors() as e:
                    if have > before:
                        patience.progress()
                    patience.wait(f"download of {part.name[:-5]} cut off at {have} bytes ({_describe(e)})")
                    continue
            if total is None or have >= total:
                return hasher
            if have == before:  # the server closed early without sending anything: wait before asking again
                patience.wait(f"{self._who(url)} sent no data at byte {have}")
            else:
                patience.progress()

    # -- plumbing --------------------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, timeout: tuple[float, float] | None = None, **kw: Any
    ) -> requests.Response:
        url = self.url(path)
        headers: dict[str, Any] = dict(kw.pop("headers", None) or {})
        if _origin(url) == self._origin:
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
        else:
            # A blob store's presigned URL: nothing meant for the orchestrator goes there (the token, the
            # protocol and sha256 headers), and a presigned PUT carries no header its signature does not
            # cover (it signs the Content-Type that upload() sends).
            headers.pop(SHA256_HEADER, None)
            headers[PROTOCOL_HEADER] = None  # a session header: None leaves it out of this request
        return self._session.request(method, url, headers=headers, timeout=timeout or self.timeout, **kw)

    def _who(self, path: str) -> str:
        url = self.url(path)
        return "orchestrator" if _origin(url) == self._origin else urlsplit(url).netloc


def _transient_errors() -> tuple[type[Exception], ...]:
    import requests

    return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def _describe(e: Exception, timeout: tuple[float, float] | None = None) -> str:
    import requests

    text = str(e).lower()
    if isinstance(e, requests.ConnectTimeout):
        return "connect timed out"
    if isinstance(e, requests.ReadTimeout) or "read timed out" in text:
        return f"no answer in {timeout[1]:g} s" if timeout else "read timed out"
    for needle, words in (("refused", "connection refused"), ("reset", "connection reset")):
        if needle in text:
            return words
    if isinstance(e, requests.exceptions.ChunkedEncodingError) or "incomplete" in text:
        return "transfer cut off"
    if "name or service" in text or "nodename" in text or "resolve" in text:
        return "host name not found"
    return type(e).__name__


def _json(r: requests.Response) -> Any:
    if not r.content or "json" not in r.headers.get("Content-Type", ""):
        return None
    try:
        return r.json()
    except ValueError:
        raise ApiError(r.status_code, f"invalid JSON in the answer: {r.text[:100]!r}") from None


def _detail(r: requests.Response) -> str:
    try:
        d = r.json().get("detail")
    except (ValueError, AttributeError):
        d = None
    if isinstance(d, list):  # FastAPI validation errors
        d = "; ".join(str(x.get("msg", x)) if isinstance(x, dict) else str(x) for x in d)
    if not d and (m := S3_MESSAGE.search(r.text[:4096])):  # an object store's XML error
        d = f"{m[1]}: {m[2]}"
    return str(d) if d else (r.text[:200].strip() or r.reason or "no detail")


def _retry_after(r: requests.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), clamped to [0, 1 h]."""
    value = r.headers.get("Retry-After")
    if not value:
        return None
    try:
        secs = float(value)
    except ValueError:
        import email.utils

        try:
            secs = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(secs, 0.0), 3600.0)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc
