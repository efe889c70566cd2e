"""Paths into object storage with the slice of ``pathlib`` the store protocol uses, over obstore.

The store (``storage.store``, ``storage.lease``) is written against paths: a local store gets
``pathlib.Path``, a store at ``s3://`` / ``gs://`` / ``az://`` gets ``ObjectPath``, and the few
operations that differ (a whole-object write, create-if-absent, removing a tree, copying a file,
opening a Zarr group) dispatch here. Object storage has no directories: a "directory" is a key
prefix that some object starts with, ``mkdir`` does nothing, and listing a directory lists the
next level of keys (files and prefixes). Create-if-absent is a conditional PUT
(``If-None-Match: *``), which S3, GCS and Azure honour (S3 since 2024). An ``ObjectPath`` holds
only the scheme, bucket and key, so it pickles to Dask workers without credentials: each process
reads them from its own environment.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import zarr
import zarr.storage

from storage.location import StoreLocation, parse_location, s3_client_options


def _obstore() -> Any:
    """The obstore module: the optional extra ``s3``, imported on the first use of a bucket."""
    import obstore  # optional extra `s3`: only stores in buckets need it

    return obstore


@functools.lru_cache(maxsize=32)
def _bucket_store(scheme: str, bucket: str, environment: str) -> Any:
    """One obstore client per bucket and environment (cached: it holds a connection pool)."""
    del environment  # part of the cache key only: a changed endpoint or key gets a new client
    from obstore.store import AzureStore, GCSStore, S3Store  # optional extra `s3`: loaded on use

    if scheme == "s3":
        return S3Store(bucket, client_options=s3_client_options())
    if scheme == "gs":
        return GCSStore(bucket)
    return AzureStore(bucket)


def _environment() -> str:
    """A digest of the cloud SDK environment (the cache key; the values themselves are not kept)."""
    cloud = sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "AZURE_")))
    return hashlib.sha256(repr(cloud).encode()).hexdigest()


@dataclass(frozen=True)
class _Stat:
    st_mtime: float
    st_size: int


class ObjectPath:
    """``<scheme>://<bucket>/<key>``: an object, or a prefix standing for a directory."""

    def __init__(self, scheme: str, bucket: str, key: str = "") -> None:
        self.scheme = scheme
        self.bucket = bucket
        self.key = key.strip("/")

    # -- pure path operations ------------------------------------------------------------------

    def __truediv__(self, name: str | os.PathLike) -> ObjectPath:
        parts = [p for p in str(name).split("/") if p]
        return ObjectPath(self.scheme, self.bucket, "/".join([p for p in [self.key, *parts] if p]))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.scheme, self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        if other.key and not (self.key + "/").startswith(other.key + "/"):
            raise ValueError(f"{self} is not below {other}")
        return PurePosixPath(self.key[len(other.key):].lstrip("/"))

    def expanduser(self) -> ObjectPath:
        return self

    def resolve(self) -> ObjectPath:
        return self

    absolute = resolve

    @property
    def location(self) -> StoreLocation:
        return StoreLocation(self.scheme, self.bucket, self.key)

    # -- object operations -----------------------------------------------------------------------

    @property
    def _store(self) -> Any:
        return _bucket_store(self.scheme, self.bucket, _environment())

    def _head(self) -> dict[str, Any] | None:
        obstore = _obstore()
        if not self.key:
            return None
        try:
            return obstore.head(self._store, self.key)
        except FileNotFoundError:
            return None

    def is_file(self) -> bool:
        return self._head() is not None

    def is_dir(self) -> bool:
        obstore = _obstore()
        prefix = self.key + "/" if self.key else ""
        for batch in obstore.list(self._store, prefix, chunk_size=1):
            return len(batch) > 0
        return False

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> _Stat:
        head = self._head()
        if head is None:
            raise FileNotFoundError(str(self))
        return _Stat(head["last_modified"].timestamp(), int(head["size"]))

    def read_bytes(self) -> bytes:
        obstore = _obstore()
        try:
            return bytes(obstore.get(self._store, self.key).bytes())
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{self}: no such object") from error

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One whole-object PUT: readers see the old object or the new one, never a part."""
        obstore = _obstore()
        obstore.put(self._store, self.key, data)

    def create(self, data: bytes) -> bool:
        """Create the object only if there is none (conditional PUT); -> False when it exists."""
        obstore = _obstore()
        from obstore.exceptions import AlreadyExistsError, PreconditionError  # optional extra `s3`

        try:
            obstore.put(self._store, self.key, data, mode="create")
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    def unlink(self, missing_ok: bool = False) -> None:
        obstore = _obstore()
        if not missing_ok and not self.is_file():
            raise FileNotFoundError(str(self))
        obstore.delete(self._store, self.key)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object is written under it."""

    def rmdir(self) -> None:
        """Nothing to do (an empty prefix does not exist); fails like ``os.rmdir`` when not empty."""
        if self.is_dir():
            raise OSError(f"{self}: directory not empty")

    def iterdir(self) -> Iterator[ObjectPath]:
        """The next level below this prefix: objects and sub-prefixes."""
        obstore = _obstore()
        prefix = self.key + "/" if self.key else None
        listing = obstore.list_with_delimiter(self._store, prefix)
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"]}
        names |= {o["path"].rsplit("/", 1)[-1] for o in listing["objects"]}
        for name in sorted(names):
            yield self / name

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Children whose name matches ``pattern`` (one level, like ``Path.glob`` without '/')."""
        return (child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern))

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        """Every object below this prefix whose name matches ``pattern`` (objects only)."""
        obstore = _obstore()
        prefix = self.key + "/" if self.key else ""
        for batch in obstore.list(self._store, prefix):
            for meta in batch:
                path = ObjectPath(self.scheme, self.bucket, meta["path"])
                if fnmatch.fnmatchcase(path.name, pattern):
                    yield path

    def remove_tree(self) -> None:
        """Delete every object below this prefix (and the object itself)."""
        obstore = _obstore()
        keys = [o.key for o in self.rglob("*")]
        if keys:
            obstore.delete(self._store, keys)
        if self.is_file():
            obstore.delete(self._store, self.key)

    def copy_to(self, target: ObjectPath) -> None:
        """Server-side copy of this object to ``target`` (same bucket)."""
        obstore = _obstore()
        obstore.copy(self._store, self.key, target.key)

    def zarr_store(self, read_only: bool = False) -> zarr.storage.ObjectStore:
        """The bucket as a Zarr store (open groups at ``path=self.key``)."""
        return zarr.storage.ObjectStore(self._store, read_only=read_only)


AnyPath = Path | ObjectPath


def as_path(value: str | os.PathLike | ObjectPath | StoreLocation) -> AnyPath:
    """A store argument as a path: ``Path`` for a local one, ``ObjectPath`` for a bucket URL."""
    if isinstance(value, ObjectPath | Path):
        return value
    location = parse_location(value) if isinstance(value, StoreLocation) or "://" in str(value) else None
    if location is None:
        return Path(value)
    if location.is_local:
        return Path(location.path)
    return ObjectPath(location.scheme, location.bucket, location.path)


def is_object_path(path: object) -> bool:
    return isinstance(path, ObjectPath)


READ_CACHE_ENV = "XMASK3D_STORE_CACHE_MB"  # per-process read cache of bucket stores (0 = off)
READ_CACHE_MB = 1024


@functools.lru_cache(maxsize=32)
def _read_cache(scheme: str, bucket: str, environment: str, max_mb: int) -> Any:
    """One in-memory LRU cache per process and bucket over zarr's reads (chunks, shard ranges)."""
    from zarr.experimental.cache_store import CacheStore  # experimental zarr API: only bucket readers

    source = zarr.storage.ObjectStore(_bucket_store(scheme, bucket, environment), read_only=True)
    return CacheStore(source, cache_store=zarr.storage.MemoryStore(), max_size=max_mb << 20,
                      cache_set_data=False)


def open_group(path: AnyPath, mode: str = "r") -> zarr.Group:
    """``zarr.open_group`` on a local directory or a bucket prefix.

    Read-only groups in a bucket go through a per-process LRU cache in memory (``XMASK3D_STORE_CACHE_MB``,
    default 1024; 0 turns it off), so training epochs after the first read views from memory, not
    the bucket. It relies on what readers rely on anyway: a complete scene does not change while it
    is read (replacing a scene while a training run reads it is not supported).
    """
    if isinstance(path, ObjectPath):
        max_mb = int(os.environ.get(READ_CACHE_ENV, READ_CACHE_MB))
        if mode == "r" and max_mb > 0:
            store = _read_cache(path.scheme, path.bucket, _environment(), max_mb)
        else:
            store = path.zarr_store(read_only=mode == "r")
        return zarr.open_group(store, path=path.key, mode=mode)
    return zarr.open_group(str(path), mode=mode)


def listdir(path: AnyPath) -> list[str]:
    """Names of the entries of a directory (a prefix's next level on object storage)."""
    if isinstance(path, ObjectPath):
        return [child.name for child in path.iterdir()]
    return os.listdir(path)


def remove_tree(path: AnyPath) -> None:
    if isinstance(path, ObjectPath):
        path.remove_tree()
    else:
        shutil.rmtree(path)


def link_or_copy(src: AnyPath, dst: AnyPath) -> None:
    """Make ``dst`` hold ``src``'s bytes: a hard link (or a copy) locally, a server-side copy in a bucket."""
    if isinstance(src, ObjectPath) and isinstance(dst, ObjectPath):
        src.copy_to(dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this file system: copy the bytes
        shutil.copyfile(src, dst)
