"""Keep credentials out of messages and logs: URLs with secrets are shown without them.

A URL may carry a secret in its user-info (``https://user:token@host/...``), in its query
(``?token=...``, a presigned signature) or, for personal download links such as ScanNet's, anywhere in
its path. ``redact_url`` hides the first two; ``public_base`` hides everything but the scheme and the
host (for a base URL known to be personal); ``redact`` scrubs every URL in a free text and any known
secret string. This module is in the lowest layer so that every other one can use it.
"""

from __future__ import annotations

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
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        netloc = f"{user}:{MASK}@{host}" if user else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{key}={MASK}" for key, _ in pairs) if pairs else MASK
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


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
