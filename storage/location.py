"""Where a store lives: a local path or an object-storage URL, and the Zarr 3 store object for it.

Accepted: a local path, ``file:///abs/path``, ``s3://bucket/prefix``, ``gs://bucket/prefix`` and
``az://container/prefix``. Credentials, region and endpoint come only from the environment each
cloud SDK reads (S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and
``AWS_ENDPOINT_URL`` for S3-compatible servers; GCS: ``GOOGLE_APPLICATION_CREDENTIALS``; Azure:
``AZURE_STORAGE_ACCOUNT_NAME`` + ``AZURE_STORAGE_ACCOUNT_KEY``); a URL that carries credentials
(``user:secret@`` or a query string such as a SAS token) is refused, and the refusal never echoes
them. Object stores are opened with obstore (zarr's ``ObjectStore``); ``backend="fsspec"`` opens the
same URL with fsspec (s3fs, gcsfs, adlfs). docs/store.md has the measurement behind the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import zarr.storage
from zarr.abc.store import Store as ZarrStore

from storage.errors import InputError

OBJECT_SCHEMES = ("s3", "gs", "az")
Backend = Literal["obstore", "fsspec"]
DEFAULT_BACKEND: Backend = "obstore"


def redact(value: str) -> str:
    """``value`` with any ``user:secret@`` and query string or fragment removed (safe to log)."""
    parts = urlsplit(str(value))
    if not parts.scheme or len(parts.scheme) == 1:  # a path (or a Windows drive letter)
        return str(value)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    userinfo = "***@" if parts.username or parts.password else ""
    query = "?***" if parts.query or parts.fragment else ""
    return f"{parts.scheme}://{userinfo}{host}{parts.path}{query}"


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store location. ``str()`` is the URL or path, safe to log (it holds no secret)."""

    scheme: str  # "file" | "s3" | "gs" | "az"
    bucket: str  # "" for a local path
    path: str  # absolute local path, or the key prefix inside the bucket (no leading/trailing '/')

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def url(self) -> str:
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.bucket}/{self.path}" if self.path else f"{self.scheme}://{self.bucket}"

    def __str__(self) -> str:
        return self.url

    def local_path(self) -> Path:
        """The directory of a local store (an error for object storage: there is no local path)."""
        if not self.is_local:
            raise InputError(f"{self}: is on object storage, not a local directory")
        return Path(self.path)

    def child(self, *names: str) -> StoreLocation:
        """The location ``names`` below this one (``loc.child('scenes', 'scene0000_00')``)."""
        parts = [p for name in names for p in str(name).split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InputError(f"{self}: invalid child path {'/'.join(names)!r}")
        if self.is_local:
            return StoreLocation("file", "", str(Path(self.path, *parts)))
        return StoreLocation(self.scheme, self.bucket, "/".join([p for p in [self.path, *parts] if p]))

    def zarr_store(self, read_only: bool = False, backend: Backend = DEFAULT_BACKEND) -> ZarrStore:
        """A Zarr 3 store rooted at this location (credentials from the environment)."""
        if self.is_local:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        if backend == "obstore":
            return zarr.storage.ObjectStore(_obstore(self), read_only=read_only)
        if backend == "fsspec":
            return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)
        raise ValueError(f"unknown store backend {backend!r} (obstore | fsspec)")


def parse_location(value: str | Path | StoreLocation) -> StoreLocation:
    """Parse a store argument; bad ones raise ``InputError`` with one line (secrets redacted)."""
    if isinstance(value, StoreLocation):
        return value
    text = str(value).strip()
    if not text:
        raise InputError("empty store location")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if not scheme or len(scheme) == 1:
        return StoreLocation("file", "", str(Path(text).expanduser().absolute()))
    if parts.username or parts.password or parts.query or parts.fragment:
        raise InputError(f"{redact(text)}: credentials or query strings in a store URL are refused; "
                         "set them in the environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"{text}: file:// URLs take an absolute path (file:///data/x.zarr)")
        return StoreLocation("file", "", str(Path(parts.path).absolute()))
    if scheme not in OBJECT_SCHEMES:
        raise InputError(f"{redact(text)}: unsupported store scheme {scheme!r} "
                         f"(a local path, file://, {', '.join(s + '://' for s in OBJECT_SCHEMES)})")
    if not parts.netloc:
        raise InputError(f"{text}: no bucket in the store URL ({scheme}://BUCKET/path)")
    prefix = parts.path.strip("/")
    if any(p in (".", "..") for p in prefix.split("/")):
        raise InputError(f"{text}: '.' and '..' are not allowed in a store URL")
    return StoreLocation(scheme, parts.netloc, prefix)


def _obstore(location: StoreLocation):
    """An obstore store for an object-storage location; configuration only from the environment."""
    from obstore.store import AzureStore, GCSStore, S3Store  # optional extra `s3`: loaded on use

    prefix = location.path or None
    if location.scheme == "s3":
        return S3Store(location.bucket, prefix=prefix, client_options=s3_client_options())
    if location.scheme == "gs":
        return GCSStore(location.bucket, prefix=prefix)
    return AzureStore(location.bucket, prefix=prefix)


def s3_client_options() -> dict[str, bool] | None:
    """obstore client options for S3: plain HTTP only when the environment's endpoint is http://
    (an S3-compatible server on a private network or 127.0.0.1)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return {"allow_http": True} if endpoint.startswith("http://") else None
