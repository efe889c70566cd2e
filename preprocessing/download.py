"""Resumable downloads from an HTTP(S) base URL or a local mirror directory.

A *source* is a base URL (``https://host/path``) or a directory; a file's relative path is
appended to it, so a mirror directory and a URL with the same relative layout behave alike.
HTTP downloads stream into ``<name>.part``, resume with a ``Range`` request after a dropped
connection, check the size against ``Content-Length`` / ``Content-Range``, and are renamed to the
final name only when complete (atomic ``os.replace``): a final name never holds a partial file,
so an existing final file is complete and is skipped. Transient failures (dropped connection,
timeout, 5xx, refused connection) are retried with exponential backoff; 4xx and size mismatches
are ``InputError``s that name the URL. Files are fetched in parallel by a bounded thread pool with
one tqdm bar (bytes, rate, ETA).
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from storage.errors import InputError

CHUNK = 1 << 20
_BAR_LOCK = threading.Lock()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently transient failures are retried."""

    retries: int = 5  # attempts after the first one
    backoff_s: float = 1.0  # wait before retry k is backoff_s * 2**k, capped at max_backoff_s
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0  # socket timeout per read


class _Transient(Exception):
    """A failure worth retrying (the server or the network, not the request)."""


def is_url(source: str | Path) -> bool:
    return isinstance(source, str) and urllib.parse.urlparse(source).scheme in ("http", "https")


def source_of(base: str | Path, relative: str) -> str | Path:
    """The URL or mirror path of ``relative`` under ``base``."""
    if is_url(base):
        return str(base).rstrip("/") + "/" + urllib.parse.quote(relative)
    return Path(base) / relative


def _grow(bar: tqdm | None, size: int) -> None:
    """Add a newly known file size to the shared bar's total (for the ETA)."""
    if bar is not None:
        with _BAR_LOCK:
            bar.total = (bar.total or 0) + size
            bar.refresh()


def _copy_from_mirror(source: Path, dest: Path, bar: tqdm | None) -> None:
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
    os.replace(part, dest)


def _total_from(response: http.client.HTTPResponse, offset: int, url: str) -> tuple[int, int]:
    """(start offset of this response, total file size) from the response headers."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        try:
            span, total = content_range.split(" ", 1)[1].split("/")
            start = int(span.split("-")[0])
            return start, int(total)
        except (IndexError, ValueError) as error:
            raise InputError(f"{url}: invalid Content-Range {content_range!r}") from error
    length = response.headers.get("Content-Length")
    if length is None:
        raise InputError(f"{url}: the server sent no Content-Length (cannot check the size)")
    return 0, int(length)


def _http_attempt(url: str, part: Path, policy: RetryPolicy, bar: tqdm | None, known: list[int]) -> int:
    """One request: resume ``part`` from its current size. Returns the total size when complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "xmask3d-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=policy.timeout_s)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing left to send: the part may already be whole
            total = error.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return offset
            part.unlink()
            raise _Transient(f"{url}: range not satisfiable, restarting") from error
        if 500 <= error.code < 600 or error.code in (408, 429):
            raise _Transient(f"{url}: HTTP {error.code}") from error
        raise InputError(f"{url}: HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        if isinstance(error.reason, OSError) and not isinstance(error.reason, socket.gaierror):
            raise _Transient(f"{url}: {error.reason}") from error  # refused, reset, timed out
        raise InputError(f"{url}: cannot connect ({error.reason})") from error
    except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
        raise _Transient(f"{url}: {error!r}") from error
    with response:
        start, total = _total_from(response, offset, url)
        if start not in (0, offset):
            part.unlink()
            raise _Transient(f"{url}: server resumed at byte {start}, expected {offset}; restarting")
        if not known:
            known.append(total)
            _grow(bar, total)
        mode = "ab" if start == offset and start > 0 else "wb"
        if mode == "wb" and offset and bar is not None:
            bar.update(-offset)  # the server ignored Range: those bytes come again
        try:
            with open(part, mode) as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
        except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
            raise _Transient(f"{url}: connection lost at byte {part.stat().st_size} of {total}") from error
    return total


def _download_http(url: str, dest: Path, policy: RetryPolicy, bar: tqdm | None) -> None:
    part = dest.with_name(dest.name + ".part")
    known: list[int] = []
    last = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(min(policy.backoff_s * 2 ** (attempt - 1), policy.max_backoff_s))
        try:
            total = _http_attempt(url, part, policy, bar, known)
        except _Transient as error:
            last = str(error)
            continue
        size = part.stat().st_size
        if size == total:
            os.replace(part, dest)
            return
        last = f"{url}: size mismatch, received {size} bytes, Content-Length says {total}"
        if size > total:  # more than announced: the part is not this file, start over
            part.unlink()
    if part.exists() and known and part.stat().st_size > known[0]:
        part.unlink()
    raise InputError(f"{last} (gave up after {policy.retries + 1} attempts)")


def fetch(base: str | Path, relative: str, out_dir: Path, policy: RetryPolicy = RetryPolicy(),
          bar: tqdm | None = None) -> Path:
    """Fetch ``relative`` from ``base`` (URL or mirror dir) to ``out_dir/relative``; skip if present."""
    dest = Path(out_dir) / relative
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = source_of(base, relative)
    if is_url(base):
        _download_http(str(source), dest, policy, bar)
    else:
        _copy_from_mirror(Path(source), dest, bar)
    return dest


def check_source(base: str | Path) -> str | Path:
    """Validate a base URL or mirror directory; InputError otherwise."""
    if isinstance(base, str) and not is_url(base):
        scheme = urllib.parse.urlparse(base).scheme
        if scheme and len(scheme) > 1:
            raise InputError(f"{base}: unsupported URL scheme {scheme!r} (use http, https or a directory)")
        base = Path(base)
    if isinstance(base, Path) and not base.is_dir():
        raise InputError(f"{base}: mirror directory does not exist")
    return base


def fetch_all(base: str | Path, relatives: Sequence[str], out_dir: Path, workers: int = 4,
              policy: RetryPolicy = RetryPolicy(), desc: str = "download") -> list[Path]:
    """Fetch many files in parallel (at most ``workers`` at a time); first error cancels the rest."""
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    base = check_source(base)
    out_dir = Path(out_dir)
    todo = [r for r in relatives if not (out_dir / r).is_file()]
    with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              disable=not todo, leave=False) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fetch, base, r, out_dir, policy, bar) for r in todo]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()
    return [out_dir / r for r in relatives]
