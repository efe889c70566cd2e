"""A real local HTTP server (stdlib) serving a directory, for download and end-to-end tests.

``serve_directory(root)`` starts a ``ThreadingHTTPServer`` on 127.0.0.1 at a free port in a
background thread and yields its base URL. It supports ``Range: bytes=N-`` (206 + Content-Range)
and can misbehave on purpose:
- ``drop_once=True``: the first GET of each file sends the full Content-Length but only half of
  the body, then closes the connection (a resumable client must resume with Range);
- ``status={"scans/x/y.ply": 403}``: answer that path with the given status;
- ``truncate={"a.txt": 10}``: announce the full size but never send more than 10 bytes of it;
- ``html``: answer every path (found or not) with 200 and one HTML page, like a login or error
  portal; ``html_type``: the Content-Type sent with it (``text/html`` by default; a misconfigured
  server may call it ``application/octet-stream``);
- ``headers={"a.txt": {"Repr-Digest": ...}}``: extra response headers for a path (checksums);
- ``log``: a list that receives ``(path, range_header_or_None)`` per GET (``("HEAD " + path, None)``
  per HEAD).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
             b"<body><form>Please sign in to continue.</form></body></html>\n")


def sha256_header(data: bytes) -> dict[str, str]:
    """A ``Repr-Digest`` header (RFC 9530) announcing the SHA-256 of ``data``."""
    return {"Repr-Digest": "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"}


def _handler(root: Path, drop_once: bool, status: dict[str, int], truncate: dict[str, int],
             log: list | None, html: bool, html_type: str, headers: dict[str, dict[str, str]]
             ) -> type[BaseHTTPRequestHandler]:
    dropped: set[str] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def _resolve(self) -> tuple[str, Path | None]:
            rel = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/")
            path = (root / rel).resolve()
            if root not in path.parents or not path.is_file():
                return rel, None
            return rel, path

        def _error(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            rel, path = self._resolve()
            if log is not None:
                log.append((rel, self.headers.get("Range")) if body else ("HEAD " + rel, None))
            if html:
                self.send_response(200)
                self.send_header("Content-Type", html_type)
                self.send_header("Content-Length", str(len(HTML_PAGE)))
                self.end_headers()
                if body:
                    self.wfile.write(HTML_PAGE)
                return None
            if rel in status:
                return self._error(status[rel])
            if path is None:
                return self._error(404)
            data = path.read_bytes()
            size = len(data)
            start = 0
            range_header = self.headers.get("Range")
            if range_header:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(size - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            for key, value in headers.get(rel, {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not body:
                return
            end = min(size, truncate.get(rel, size))
            with lock:
                drop = drop_once and rel not in dropped and size - start >= 2
                if drop:
                    dropped.add(rel)
            if drop:
                end = start + (size - start) // 2
            if end > start:
                self.wfile.write(data[start:end])
            if end < size:
                self.wfile.flush()
                self.close_connection = True

    return Handler


@contextlib.contextmanager
def serve_directory(root: Path, drop_once: bool = False, status: dict[str, int] | None = None,
                    truncate: dict[str, int] | None = None, log: list | None = None, html: bool = False,
                    html_type: str = "text/html; charset=utf-8",
                    headers: dict[str, dict[str, str]] | None = None) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1:<free port>; yields the base URL (no trailing /)."""
    handler = _handler(Path(root).resolve(), drop_once, status or {}, truncate or {}, log, html, html_type,
                       headers or {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="serve_directory", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
