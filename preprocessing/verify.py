"""What a downloaded file must look like before it takes its final name: its type and its checksum.

A server that answers an HTML page (a login form, an error page, a captive portal) for every path
sends files of the right names and a consistent size; only their content tells them apart. So each
file is checked by its first bytes against the format its name promises (``.sens`` version 4,
``ply`` header, zip and tar signatures, JSON, text that is not markup), and against a checksum
whenever one is known: published by the server in a response header (``Repr-Digest``, ``Digest``,
``Content-MD5``, ``x-goog-hash``, an S3 ETag) or listed in a checksum file given by the user
(``sha256sum`` / ``md5sum`` format).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Mapping
from pathlib import Path

from storage.errors import InputError

HEAD_BYTES = 512
_MARKUP = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<error")
_HEX_ALGORITHMS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
_HEADER_ALGORITHMS = {"md5": "md5", "sha": "sha1", "sha-1": "sha1", "sha-256": "sha256", "sha-512": "sha512"}
_S3_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


def is_markup(head: bytes) -> bool:
    """Whether ``head`` starts (after a BOM and whitespace) like an HTML or XML page."""
    start = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:16].lower()
    return start.startswith(_MARKUP)


def _sens(head: bytes) -> str | None:
    if len(head) < 4:
        return "shorter than a .sens header"
    version = struct.unpack("<I", head[:4])[0]
    return None if version == 4 else f"not a .sens file (version field {version}, expected 4)"


def _starts(*magic: bytes, what: str):
    def check(head: bytes) -> str | None:
        return None if head.startswith(magic) else f"not a {what} (starts with {head[:8]!r})"
    return check


def _tar(head: bytes) -> str | None:
    return None if head[257:262] == b"ustar" else "not a tar archive (no ustar header)"


def _json(head: bytes) -> str | None:
    start = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    return None if start in (b"{", b"[") else f"not JSON (starts with {head[:8]!r})"


def _text(head: bytes) -> str | None:
    return "a markup page, not a text file" if head.lstrip().startswith(b"<") else None


_CHECKS = {
    ".sens": _sens,
    ".ply": _starts(b"ply\n", b"ply\r\n", what="PLY file"),
    ".zip": _starts(b"PK\x03\x04", b"PK\x05\x06", what="zip archive"),
    ".tar": _tar,
    ".json": _json,
    ".txt": _text,
    ".tsv": _text,
}


def content_problem(head: bytes, name: str) -> str | None:
    """Why a file named ``name`` whose first bytes are ``head`` is not what its name says; None if fine.

    Unknown suffixes are only checked for being an HTML/XML page.
    """
    if is_markup(head):
        return "an HTML/XML page, not the expected file (the server answered with a web page)"
    check = _CHECKS.get(Path(name).suffix.lower())
    return check(head) if check else None


def file_problem(path: Path, name: str | None = None) -> str | None:
    """``content_problem`` of a file on disk (an empty file is a problem too)."""
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    if not head:
        return "empty file"
    return content_problem(head, name or path.name)


def looks_like_html(content_type: str | None) -> bool:
    """Whether a Content-Type header announces a web page."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind in ("text/html", "application/xhtml+xml")


# --- checksums --------------------------------------------------------------------------------------


def _b64_hex(value: str) -> str | None:
    try:
        return base64.b64decode(value.strip().strip(":"), validate=True).hex()
    except (binascii.Error, ValueError):
        return None


def header_digests(headers: Mapping[str, str], full_body: bool) -> dict[str, str]:
    """Checksums of the whole file a response announces: algorithm -> hex digest.

    ``full_body``: the response carries the whole file (a 200), so per-body headers
    (``Content-MD5``, ``Digest``) describe the file; on a 206 only whole-representation headers
    count (``Repr-Digest``, ``x-goog-hash``, an S3 ETag).
    """
    found: dict[str, str] = {}
    lists = [headers.get("Repr-Digest"), headers.get("x-goog-hash")]
    if full_body:
        lists.append(headers.get("Digest"))
        if headers.get("Content-MD5"):
            lists.append(f"md5={headers['Content-MD5']}")
    for value in lists:
        for item in (value or "").split(","):
            name, _, encoded = item.strip().partition("=")
            algorithm = _HEADER_ALGORITHMS.get(name.strip().lower())
            digest = _b64_hex(encoded) if algorithm else None
            if algorithm and digest:
                found.setdefault(algorithm, digest)
    etag = headers.get("ETag") or ""
    s3 = headers.get("x-amz-request-id") or "amazons3" in (headers.get("Server") or "").lower()
    match = _S3_ETAG.match(etag)
    if s3 and match:  # a single-part S3 object: its ETag is the MD5 of its bytes
        found.setdefault("md5", match.group(1).lower())
    return found


def read_checksum_file(path: Path) -> dict[str, str]:
    """A ``sha256sum``/``md5sum`` file -> relative path -> hex digest (algorithm from its length)."""
    sums: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the checksum file ({error})") from error
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().removeprefix("*").removeprefix("./")
        if len(digest) not in _HEX_ALGORITHMS or not name or not re.fullmatch(r"[0-9a-fA-F]+", digest):
            raise InputError(f"{path}:{number}: not a '<hex digest>  <path>' line")
        sums[name] = digest.lower()
    return sums


def algorithm_of(hex_digest: str) -> str:
    return _HEX_ALGORITHMS[len(hex_digest)]


def file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def checksum_problem(path: Path, expected: Mapping[str, str]) -> str | None:
    """Compare ``path`` with the first known checksum (algorithm -> hex); None if it matches or none."""
    for algorithm in ("sha256", "sha512", "sha1", "md5"):
        if algorithm in expected:
            got = file_digest(path, algorithm)
            if got != expected[algorithm].lower():
                return f"{algorithm} checksum mismatch (got {got}, expected {expected[algorithm].lower()})"
            return None
    return None
