"""Store locations: parsing, redaction, and Zarr stores on a real S3-compatible server (moto)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from storage.errors import InputError
from storage.location import StoreLocation, parse_location, redact


def test_parse_local_and_urls(tmp_path):
    local = parse_location(tmp_path / "a.zarr")
    assert local.is_local and local.local_path() == tmp_path / "a.zarr"
    assert parse_location(f"file://{tmp_path}/a.zarr") == local
    s3 = parse_location("s3://bucket/some/prefix/scannet.zarr/")
    assert (s3.scheme, s3.bucket, s3.path) == ("s3", "bucket", "some/prefix/scannet.zarr")
    assert str(s3) == "s3://bucket/some/prefix/scannet.zarr"
    assert str(s3.child("scenes", "scene0000_00")) == "s3://bucket/some/prefix/scannet.zarr/scenes/scene0000_00"
    assert parse_location("gs://b/x.zarr").scheme == "gs" and parse_location("az://c/x.zarr").bucket == "c"
    assert str(parse_location("s3://bucket")) == "s3://bucket"
    assert local.child("scenes").local_path() == tmp_path / "a.zarr" / "scenes"
    with pytest.raises(InputError, match="not a local directory"):
        s3.local_path()


@pytest.mark.parametrize("bad, message", [
    ("ftp://host/x.zarr", "unsupported store scheme"),
    ("s3:///x.zarr", "no bucket"),
    ("s3://bucket/a/../b", "not allowed"),
    ("file://otherhost/x", "absolute path"),
    ("", "empty"),
])
def test_bad_locations_are_one_line_input_errors(bad, message):
    with pytest.raises(InputError, match=message) as info:
        parse_location(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("url", [
    "s3://AKIAEXAMPLE:hunter2secret@bucket/x.zarr",
    "az://container/x.zarr?sv=2024&sig=hunter2secret",
])
def test_credentials_in_urls_are_refused_and_never_echoed(url):
    with pytest.raises(InputError, match="refused") as info:
        parse_location(url)
    assert "hunter2secret" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
    assert "hunter2secret" not in redact(url)
    assert redact("/data/x.zarr") == "/data/x.zarr"


@pytest.mark.parametrize("backend", ["obstore", "fsspec"])
def test_zarr_round_trip_on_s3(s3_bucket, backend):
    """A group written through each backend is in the bucket (seen by boto3) and reads back equal."""
    loc = parse_location(s3_bucket.url("stores", "t.zarr"))
    data = np.arange(1000, dtype=np.float32).reshape(250, 4)
    root = zarr.open_group(loc.zarr_store(backend=backend), mode="w", attributes={"k": 1})
    root.create_array("a/b", shape=data.shape, chunks=(100, 4), dtype="float32")[...] = data
    keys = s3_bucket.keys("stores/t.zarr/")
    assert "stores/t.zarr/zarr.json" in keys and "stores/t.zarr/a/b/zarr.json" in keys
    assert sum(k.startswith("stores/t.zarr/a/b/c/") for k in keys) == 3  # three chunks of rows
    other = "fsspec" if backend == "obstore" else "obstore"
    back = zarr.open_group(loc.zarr_store(read_only=True, backend=other), mode="r")
    assert back.attrs["k"] == 1
    np.testing.assert_array_equal(back["a/b"][...], data)
    with pytest.raises(Exception):  # noqa: B017 - zarr raises its own read-only error types
        back.create_array("c", shape=(1,), dtype="int8")


@pytest.mark.parametrize("backend", ["obstore", "fsspec"])
def test_store_objects_do_not_show_the_secret(s3_bucket, monkeypatch, backend):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-hunter2")
    store = StoreLocation("s3", s3_bucket.name, "x.zarr").zarr_store(backend=backend)
    zarr.open_group(store, mode="w")  # moto accepts any key pair: the store did authenticate
    assert "hunter2" not in repr(store) and "hunter2" not in str(store)


def test_object_paths_on_s3(s3_bucket):
    """The pathlib slice the store protocol relies on, against the real S3 API."""
    import pickle

    from storage.objects import ObjectPath, as_path, listdir, remove_tree

    root = as_path(s3_bucket.url("st.zarr"))
    assert isinstance(root, ObjectPath) and not root.exists() and listdir(root) == []
    (root / "scenes" / "a" / "zarr.json").write_bytes(b"{}")
    (root / "scenes" / "a" / "x" / "c" / "0").write_bytes(b"123")
    (root / "scenes" / ".claim-a").write_bytes(b"owner")
    scenes = root / "scenes"
    assert scenes.is_dir() and not scenes.is_file() and (scenes / ".claim-a").is_file()
    assert listdir(scenes) == [".claim-a", "a"]  # objects and prefixes of the next level only
    assert [p.name for p in scenes.glob(".claim-*")] == [".claim-a"]
    below = sorted(str(p.relative_to(scenes / "a")) for p in (scenes / "a").rglob("*"))
    assert below == ["x/c/0", "zarr.json"]
    assert (scenes / "lock").create(b"first") and not (scenes / "lock").create(b"second")
    assert (scenes / "lock").read_bytes() == b"first"  # the conditional PUT kept the first writer's
    (scenes / "a" / "x" / "c" / "0").copy_to(scenes / "b" / "c" / "0")
    assert (scenes / "b" / "c" / "0").read_bytes() == b"123"
    with pytest.raises(FileNotFoundError):
        (scenes / "missing").read_bytes()
    remove_tree(scenes / "a")
    assert not (scenes / "a").exists() and (scenes / "b").is_dir()
    assert pickle.loads(pickle.dumps(root)) == root  # to Dask workers: scheme, bucket and key only
    assert b"secret" not in pickle.dumps(root)


def test_bucket_reads_are_cached_in_memory_per_process(s3_bucket, monkeypatch):
    from storage.objects import as_path, open_group

    path = as_path(s3_bucket.url("c.zarr"))
    data = np.arange(600, dtype=np.int32).reshape(200, 3)
    open_group(path, mode="w").create_array("a", shape=data.shape, chunks=(50, 3), dtype="int32")[...] = data
    np.testing.assert_array_equal(open_group(path, mode="r")["a"][...], data)  # read once: cached
    client = s3_bucket.client()
    for key in s3_bucket.keys("c.zarr/a/c/"):
        client.delete_object(Bucket=s3_bucket.name, Key=key)
    np.testing.assert_array_equal(open_group(path, mode="r")["a"][...], data)  # served from memory
    monkeypatch.setenv("XMASK3D_STORE_CACHE_MB", "0")
    assert (open_group(path, mode="r")["a"][...] == 0).all()  # uncached: the bucket's chunks are gone
