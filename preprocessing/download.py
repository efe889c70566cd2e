"""Resumable, verified downloads from an HTTP(S) base URL or a local mirror directory.

A *source* is a base URL (``https://host/path``) or a directory; a file's relative path is
appended to it, so a mirror directory and a URL with the same relative layout behave alike.
HTTP downloads stream into ``<name>.part``, resume with a ``Range`` request after a dropped
connection, and take the final name (atomic ``os.replace``) only once verified: the size matches
``Content-Length`` / ``Content-Range``, the first bytes match the format the name promises (an HTML
page is refused, whatever its ``Content-Type``), and the checksum matches when one is known (a
checksum file, or a header the server sends; ``preprocessing.verify``). An existing final file is
skipped when its first bytes are of the right type (a cheap check that catches files saved by
older versions from a web page); ``verify=True`` re-checks existing files against the source (size,
checksum) and fetches again those that fail.

Transient failures (dropped connection, timeout, 5xx) are retried with exponential backoff; a
refused connection only ``refused_retries`` times (the server is down or the URL is wrong), then
one clear message. 4xx, bad content and checksum mismatches are ``InputError``s. Base URLs are
personal (a token may be anywhere in them), so messages show only their scheme and host
(``storage.redact.public_base``). Files are fetched in parallel by a bounded thread pool with one
tqdm bar (bytes, rate, ETA).
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from preprocessing import verify as checks
from storage.errors import InputError
from storage.redact import public_base, split_userinfo

CHUNK = 1 << 20
_BAR_LOCK = threading.Lock()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently transient failures are retried."""

    retries: int = 5  # attempts after the first one
    backoff_s: float = 1.0  # wait before retry k is backoff_s * 2**k, capped at max_backoff_s
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0  # socket timeout per read
    refused_retries: int = 2  # a refused connection is retried this often only


class _Transient(Exception):
    """A failure worth retrying (the server or the network, not the request)."""


class _Refused(_Transient):
    """Nobody accepts connections at the host and port."""


class _HTTPClientError(InputError):
    """A 4xx answer (bad request, not found, forbidden): not worth retrying."""

    def __init__(self, message: str, code: int, content_range: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.content_range = content_range


@dataclass
class _Remote:
    """What the server said about a file: its size and any checksums it published."""

    total: int | None = None
    digests: dict[str, str] = field(default_factory=dict)


def is_url(source: str | Path) -> bool:
    return isinstance(source, str) and urllib.parse.urlparse(source).scheme in ("http", "https")


def source_of(base: str | Path, relative: str) -> str | Path:
    """The URL or mirror path of ``relative`` under ``base`` (a base URL's query, e.g. a token, is kept)."""
    if is_url(base):
        parts = urllib.parse.urlsplit(str(base))
        path = parts.path.rstrip("/") + "/" + urllib.parse.quote(relative)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    return Path(base) / relative


def shown(base: str | Path, relative: str) -> str:
    """How messages name ``relative`` under ``base``: a URL without its path, query or user-info."""
    if is_url(base):
        return public_base(str(base)) + "/" + relative
    return str(Path(base) / relative)


def _grow(bar: tqdm | None, size: int) -> None:
    """Add a newly known file size to the shared bar's total (for the ETA)."""
    if bar is not None:
        with _BAR_LOCK:
            bar.total = (bar.total or 0) + size
            bar.refresh()


def _accept(part: Path, dest: Path, name: str, relative: str, digests: Mapping[str, str]) -> None:
    """Give ``part`` its final name if its type and checksum are right; else delete it, InputError."""
    problem = checks.file_problem(part, relative) or checks.checksum_problem(part, digests)
    if problem:
        part.unlink()
        raise InputError(f"{name}: {problem}; nothing kept")
    os.replace(part, dest)


def _copy_from_mirror(source: Path, dest: Path, relative: str, expected: Mapping[str, str],
                      bar: tqdm | None) -> None:
    if not source.is_file():
        raise InputError(f"{source}: not found in the mirror directory")
    size = source.stat().st_size
    _grow(bar, size)
    part = dest.with_name(dest.name + ".part")
    with open(source, "rb") as src, open(part, "wb") as out:
        while block := src.read(CHUNK):
            out.write(block)
            if bar is not None:
                bar.update(len(block))
    if part.stat().st_size != size:
        part.unlink()
        raise InputError(f"{source}: copied {part.stat().st_size} of {size} bytes")
    _accept(part, dest, str(source), relative, expected)


def _total_from(response: http.client.HTTPResponse, name: str) -> tuple[int, int]:
    """(start offset of this response, total file size) from the response headers."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        try:
            span, total = content_range.split(" ", 1)[1].split("/")
            start = int(span.split("-")[0])
            return start, int(total)
        except (IndexError, ValueError):
            raise InputError(f"{name}: invalid Content-Range {content_range!r}") from None
    length = response.headers.get("Content-Length")
    if length is None:
        raise InputError(f"{name}: the server sent no Content-Length (cannot check the size)")
    return 0, int(length)


def _request(url: str, method: str = "GET", **headers: str) -> urllib.request.Request:
    """A request for ``url``; ``user:token@`` in it goes into an Authorization header instead."""
    bare, auth = split_userinfo(url)
    headers = {"User-Agent": "xmask3d-download", **headers}
    request = urllib.request.Request(bare, method=method, headers=headers)
    if auth:
        request.add_header("Authorization", auth)
    return request


def _open(request: urllib.request.Request, name: str, policy: RetryPolicy) -> http.client.HTTPResponse:
    """urlopen with failures sorted into retryable (``_Transient``/``_Refused``) and ``InputError``.

    Raised from None: the library's own messages may repeat the URL.
    """
    try:
        return urllib.request.urlopen(request, timeout=policy.timeout_s)  # noqa: S310 - http(s) only
    except urllib.error.HTTPError as error:
        if 500 <= error.code < 600 or error.code in (408, 429):
            raise _Transient(f"{name}: HTTP {error.code}") from None
        raise _HTTPClientError(f"{name}: HTTP {error.code} {error.reason}", error.code,
                               error.headers.get("Content-Range", "")) from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, ConnectionRefusedError):
            raise _Refused(f"{name}: connection refused") from None
        if isinstance(reason, OSError) and not isinstance(reason, socket.gaierror):
            raise _Transient(f"{name}: {type(reason).__name__} {reason.strerror or ''}".rstrip()) from None
        raise InputError(f"{name}: cannot connect ({type(reason).__name__})") from None
    except http.client.InvalidURL:
        raise InputError(f"{name}: invalid URL") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
        raise _Transient(f"{name}: {type(error).__name__}") from None


def _http_attempt(url: str, name: str, part: Path, policy: RetryPolicy, bar: tqdm | None,
                  remote: _Remote) -> int:
    """One request: resume ``part`` from its current size. Returns the total size when complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = _request(url, **({"Range": f"bytes={offset}-"} if offset else {}))
    try:
        response = _open(request, name, policy)
    except _HTTPClientError as error:
        if error.code == 416 and offset:  # nothing left to send: the part may already be whole
            total = error.content_range.rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return offset
            part.unlink()
            raise _Transient(f"{name}: range not satisfiable, restarting") from None
        raise
    with response:
        if checks.looks_like_html(response.headers.get("Content-Type")):
            raise InputError(f"{name}: the server answered a web page (Content-Type "
                             f"{response.headers.get('Content-Type')}), not the file; nothing kept")
        start, total = _total_from(response, name)
        if start not in (0, offset):
            part.unlink()
            raise _Transient(f"{name}: server resumed at byte {start}, expected {offset}; restarting")
        if remote.total is None:
            _grow(bar, total)
        remote.total = total
        for algorithm, digest in checks.header_digests(response.headers, response.status == 200).items():
            remote.digests.setdefault(algorithm, digest)
        mode = "ab" if start == offset and start > 0 else "wb"
        if mode == "wb" and offset and bar is not None:
            bar.update(-offset)  # the server ignored Range: those bytes come again
        try:
            with open(part, mode) as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
        except (TimeoutError, ConnectionError, http.client.HTTPException):
            raise _Transient(f"{name}: connection lost at byte {part.stat().st_size} of {total}") from None
    return total


def _download_http(url: str, name: str, relative: str, dest: Path, expected: Mapping[str, str],
                   policy: RetryPolicy, bar: tqdm | None) -> None:
    part = dest.with_name(dest.name + ".part")
    remote = _Remote()
    last = ""
    refused = 0
    attempt = 0
    while attempt <= policy.retries:
        if attempt:
            time.sleep(min(policy.backoff_s * 2 ** (attempt - 1), policy.max_backoff_s))
        attempt += 1
        try:
            total = _http_attempt(url, name, part, policy, bar, remote)
        except _Refused as error:
            refused += 1
            if refused > policy.refused_retries:
                raise InputError(f"{name}: connection refused ({refused} attempts); is the server running "
                                 "and the URL right?") from None
            last = str(error)
            continue
        except _Transient as error:
            last = str(error)
            continue
        size = part.stat().st_size
        if size == total:
            _accept(part, dest, name, relative, {**remote.digests, **expected})
            return
        last = f"{name}: size mismatch, received {size} bytes, Content-Length says {total}"
        if size > total:  # more than announced: the part is not this file, start over
            part.unlink()
    if part.exists() and remote.total is not None and part.stat().st_size > remote.total:
        part.unlink()
    raise InputError(f"{last} (gave up after {attempt} attempts)")


def _remote_info(url: str, name: str, policy: RetryPolicy) -> _Remote:
    """Size and published checksums of a remote file, from a HEAD request (GET of byte 0 if refused)."""
    request = _request(url, method="HEAD")
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(min(policy.backoff_s * 2 ** (attempt - 1), policy.max_backoff_s))
        try:
            with _open(request, name, policy) as response:
                length = response.headers.get("Content-Length")
                return _Remote(int(length) if length and length.isdigit() else None,
                               checks.header_digests(response.headers, full_body=True))
        except _HTTPClientError as error:
            if request.get_method() == "HEAD" and error.code in (403, 405):
                request = _request(url, Range="bytes=0-0")
                with _open(request, name, policy) as response:
                    total = response.headers.get("Content-Range", "").rpartition("/")[2]
                    return _Remote(int(total) if total.isdigit() else None,
                                   checks.header_digests(response.headers, full_body=False))
            raise
        except _Transient:
            continue
    raise InputError(f"{name}: the server did not answer a size request (gave up after "
                     f"{policy.retries + 1} attempts)")


def _stale_reason(base: str | Path, relative: str, dest: Path, expected: Mapping[str, str],
                  policy: RetryPolicy, deep: bool) -> str | None:
    """Why an existing final file must be fetched again; None if it is good.

    Always: its first bytes are of the right type. ``deep``: also its size against the source's and
    its checksum against the known one (checksum file, or what the server publishes).
    """
    problem = checks.file_problem(dest, relative)
    if problem or not deep:
        return problem
    if is_url(base):
        remote = _remote_info(str(source_of(base, relative)), shown(base, relative), policy)
    else:
        source = Path(source_of(base, relative))
        remote = _Remote(source.stat().st_size if source.is_file() else None)
    size = dest.stat().st_size
    if remote.total is not None and size != remote.total:
        return f"{size} bytes on disk, the source has {remote.total}"
    return checks.checksum_problem(dest, {**remote.digests, **expected})


def fetch(base: str | Path, relative: str, out_dir: Path, policy: RetryPolicy = RetryPolicy(),
          bar: tqdm | None = None, checksums: Mapping[str, str] | None = None, verify: bool = False) -> Path:
    """Fetch ``relative`` from ``base`` (URL or mirror dir) to ``out_dir/relative``.

    An existing file is kept if it is of the right type (and, with ``verify``, of the source's size
    and checksum); otherwise it is deleted and fetched again. ``checksums``: relative path -> hex
    digest (``verify.read_checksum_file``).
    """
    dest = Path(out_dir) / relative
    name = shown(base, relative)
    expected = {}
    if checksums and relative in checksums:
        expected = {checks.algorithm_of(checksums[relative]): checksums[relative]}
    if dest.is_file():
        reason = _stale_reason(base, relative, dest, expected, policy, deep=verify)
        if reason is None:
            return dest
        log.warning("%s: %s; fetching it again", dest, reason)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_url(base):
        _download_http(str(source_of(base, relative)), name, relative, dest, expected, policy, bar)
    else:
        _copy_from_mirror(Path(source_of(base, relative)), dest, relative, expected, bar)
    return dest


def check_source(base: str | Path) -> str | Path:
    """Validate a base URL or mirror directory; InputError otherwise (never repeating a URL's secrets)."""
    if isinstance(base, str) and not is_url(base):
        scheme = urllib.parse.urlparse(base).scheme
        if scheme and len(scheme) > 1:
            raise InputError(f"unsupported URL scheme {scheme!r} (use http, https or a directory)")
        base = Path(base)
    if isinstance(base, Path) and not base.is_dir():
        raise InputError(f"{base}: mirror directory does not exist")
    return base


def fetch_all(base: str | Path, relatives: Sequence[str], out_dir: Path, workers: int = 4,
              policy: RetryPolicy = RetryPolicy(), desc: str = "download",
              checksums: Mapping[str, str] | None = None, verify: bool = False) -> list[Path]:
    """Fetch many files in parallel (at most ``workers`` at a time); first error cancels the rest."""
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    base = check_source(base)
    out_dir = Path(out_dir)
    with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              disable=not relatives, leave=False) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fetch, base, r, out_dir, policy, bar, checksums, verify) for r in relatives]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        wait(futures)  # the running ones finish; the first error in list order is reported
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()
    return [out_dir / r for r in relatives]
