"""Keep credentials out of messages and logs: URLs with secrets are shown without them.

A URL may carry a secret in its user-info (``https://user:token@host/...``), in its query
(``?token=...``, a presigned signature) or, for personal download links such as ScanNet's, anywhere in
its path. ``redact_url`` hides the first two; ``public_base`` hides everything but the scheme and the
host (for a base URL known to be personal); ``redact`` scrubs every URL in a free text and any known
secret string. This module is in the lowest layer so that every other one can use it.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Iterable

MASK = "***"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` with its password (or lone user token) and its query values replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return MASK
    result = url.split("#", 1)[0]
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        result = result.replace(netloc, f"{user}:{MASK}@{host}" if user else f"{MASK}@{host}", 1)
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = "&".join(f"{key}={MASK}" for key, _ in pairs) if pairs else MASK
        result = result.split("?", 1)[0] + "?" + query
    return result


def secrets_in_url(url: str) -> list[str]:
    """The credentials inside a URL (its password, or a lone user token, and its query values), raw and
    percent-decoded, for ``redact`` of texts that may quote them outside a URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        found = [parts.password or "", parts.username if parts.password is None else ""]
    except ValueError:
        return [url]
    found += [value for _, value in urllib.parse.parse_qsl(parts.query)]
    found += [raw.partition("=")[2] for raw in parts.query.split("&")]
    return sorted({v for s in found if s for v in (s, urllib.parse.unquote(s))}, key=len, reverse=True)


def public_base(url: str) -> str:
    """Scheme and host of a personal base URL, with the rest (path, query, user-info) hidden."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return MASK
    hidden = "/" + MASK if (parts.path.strip("/") or parts.query or "@" in parts.netloc) else ""
    return f"{parts.scheme}://{host}{port}{hidden}"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with each non-empty secret replaced by ``***`` and every URL in it redacted."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _URL.sub(lambda match: redact_url(match.group(0)), text)


def split_userinfo(url: str) -> tuple[str, str | None]:
    """(``url`` without ``user:token@``, the matching HTTP basic ``Authorization`` value or None).

    HTTP clients get the credentials as a header, so they never sit in a URL a library may echo.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    host = parts.netloc.rsplit("@", 1)[1]
    pair = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, "Basic " + base64.b64encode(pair.encode()).decode()
