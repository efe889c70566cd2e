"""The Zarr store: schema on disk, atomic scene writes, refusing incompatible paths and stores."""

import json
import os

import numpy as np
import pytest
import zarr

from storage.errors import InputError
from storage.schema import ARRAYS, SCHEMA_VERSION
from storage.store import StoreWriteError, create_store, open_store, recover_store


def entries(store):
    """What is in scenes/ besides the group's own metadata."""
    return sorted(p for p in os.listdir(store.scenes_dir) if p != "zarr.json")


def write_scene(store, scene_id, frames=3, split="train", H=12, W=16, fail_after=None):
    rng = np.random.default_rng(0)
    with store.writer(scene_id) as w:
        w.write("points/xyz", rng.normal(size=(50, 3)).astype(np.float32))
        w.write("points/rgb", rng.integers(0, 255, (50, 3), dtype=np.uint8))
        w.begin_frames(frames + 2, (W, H))  # announced more than come: trimmed at the end
        for i in range(frames):
            w.add_frame(np.full((H, W, 3), i, np.uint8), np.full((H, W), 1000 + i, np.uint16))
            if fail_after is not None and i == fail_after:
                raise OSError(28, "No space left on device")
        n = w.end_frames()
        w.write("frames/index", np.arange(n, dtype=np.int32) * 20)
        w.write("proj/offsets", np.array([0, 2, 2, 5][:n + 1], np.int64))
        w.write("proj/point", np.array([1, 7, 0, 3, 4], np.int32))
        w.write("proj/uv", np.arange(10, dtype=np.uint16).reshape(5, 2))
        w.write("captions/text", np.array(["a", "", "c"][:n]))
        w.write("captions/clip", np.ones((n, 4), np.float16))
        w.commit({"split": split, "num_frames": n, "num_points": 50, "depth_scale": 1000.0})


def test_create_write_and_read_back(tmp_path):
    store = create_store(tmp_path / "s.zarr", "scannet", "openclip-tiny", 4)
    write_scene(store, "scene0000_00")
    write_scene(store, "scene0001_00", split="val", frames=2)
    ro = open_store(tmp_path / "s.zarr")
    assert ro.attrs == {"schema_version": SCHEMA_VERSION, "dataset": "scannet",
                        "created_by": "xmask3d-pipeline", "text_encoder": "openclip-tiny", "text_dim": 4}
    assert ro.scene_ids() == ["scene0000_00", "scene0001_00"]
    assert ro.scene_ids("val") == ["scene0001_00"]
    scene = ro.scene("scene0000_00")
    assert scene.num_frames == 3 and scene.attrs["complete"] is True
    assert scene["frames/color"].shape == (3, 12, 16, 3)
    assert scene["frames/color"].chunks == (1, 12, 16, 3)
    assert scene["frames/color"].shards == (5, 12, 16, 3)  # one shard for the scene's frames
    assert scene["frames/color"][2, 0, 0].tolist() == [2, 2, 2]
    assert scene.depth_m(1)[0, 0] == pytest.approx(1.001)
    point, uv = scene.view(2)
    assert point.tolist() == [0, 3, 4] and uv.tolist() == [[4, 5], [6, 7], [8, 9]]
    assert scene.view(1)[0].size == 0
    assert scene["captions/text"][:].tolist() == ["a", "", "c"]
    for name in ("points/xyz", "frames/color", "proj/point", "captions/clip"):
        assert scene[name].dtype == np.dtype(ARRAYS[name].dtype)
        codecs = json.loads((scene.path / name / "zarr.json").read_text())["codecs"]
        assert "zstd" in json.dumps(codecs) and "bitshuffle" in json.dumps(codecs)
    # the frames of a scene live in one shard file per array
    assert len([p for p in (scene.path / "frames/color").rglob("*") if p.is_file()]) == 2  # meta + shard
    with pytest.raises(IndexError):
        scene.view(3)
    with pytest.raises(InputError, match="no complete scene"):
        ro.scene("scene0009_00")
    with pytest.raises(InputError, match="read-only"):
        ro.writer("scene0002_00")


def test_refuses_a_file_a_foreign_directory_and_other_schema_versions(tmp_path):
    path = tmp_path / "file.zarr"
    path.write_text("precious")
    with pytest.raises(InputError, match="is a file"):
        create_store(path, "scannet", None, 0)
    with pytest.raises(InputError, match="is a file"):
        open_store(path)
    assert path.read_text() == "precious"

    other = tmp_path / "dir"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a Zarr store"):
        create_store(other, "scannet", None, 0)
    with pytest.raises(InputError, match="zarr.json missing"):
        open_store(other)

    old = tmp_path / "old.zarr"
    zarr.open_group(str(old), mode="w").attrs.update({"schema_version": 0, "dataset": "scannet"})
    before = (old / "zarr.json").read_text()
    with pytest.raises(InputError, match="schema version 0"):
        create_store(old, "scannet", None, 0)
    with pytest.raises(InputError, match="schema version 0"):
        open_store(old)
    assert (old / "zarr.json").read_text() == before


def test_reopening_checks_dataset_and_text_encoder(tmp_path):
    path = tmp_path / "s.zarr"
    create_store(path, "scannet", "minilm", 384)
    assert create_store(path, "scannet", "minilm", 384).attrs["text_dim"] == 384
    with pytest.raises(InputError, match="dataset 'scannet'"):
        create_store(path, "s3dis", "minilm", 384)
    with pytest.raises(InputError, match="embedded with 'minilm'"):
        create_store(path, "scannet", "openclip-tiny", 64)


def test_failing_write_says_so_and_leaves_no_scene(tmp_path):
    store = create_store(tmp_path / "s.zarr", "scannet", None, 0)
    with pytest.raises(StoreWriteError, match="No space left on device.*partial scene was removed"):
        write_scene(store, "scene0000_00", fail_after=1)
    assert store.scene_ids() == []
    assert entries(store) == []


def test_failing_zarr_store_write_is_reported(tmp_path, monkeypatch):
    """A failing disk inside zarr's own writes (not just our code) ends the same way."""
    from zarr.storage import LocalStore

    store = create_store(tmp_path / "s.zarr", "scannet", None, 0)
    real_set = LocalStore.set
    calls = {"n": 0}

    async def failing_set(self, key, value):
        calls["n"] += 1
        if "frames/color" in key and "/c/" in key:
            raise OSError(28, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        write_scene(store, "scene0000_00")
    monkeypatch.undo()
    assert calls["n"] > 0
    assert store.scene_ids() == [] and entries(store) == []


def test_overwrite_replaces_atomically_and_stale_tmp_is_removed(tmp_path):
    store = create_store(tmp_path / "s.zarr", "scannet", None, 0)
    write_scene(store, "scene0000_00", frames=3)
    write_scene(store, "scene0000_00", frames=2)
    assert store.scene("scene0000_00").num_frames == 2
    assert entries(store) == ["scene0000_00"]
    # a crashed writer leaves a group without its marker (and a legacy .tmp- group): neither is a
    # scene, and with no live owner cleanup removes both
    (store.scenes_dir / "scene0001_00" / "points").mkdir(parents=True)
    zarr.open_group(str(store.scenes_dir / "scene0001_00"), mode="a").attrs["split"] = "train"
    (store.scenes_dir / ".tmp-scene0002_00" / "points").mkdir(parents=True)
    assert store.scene_ids() == ["scene0000_00"]
    assert sorted(recover_store(store)) == ["removed .tmp-scene0002_00",
                                            "removed unfinished scene scene0001_00"]
    assert entries(store) == ["scene0000_00"]


def test_rejects_bad_scene_ids_and_dtypes(tmp_path):
    store = create_store(tmp_path / "s.zarr", "scannet", None, 0)
    with pytest.raises(InputError, match="invalid scene id"):
        store.writer("../x")
    with pytest.raises(TypeError, match="points/xyz: expected float32"):
        with store.writer("scene0000_00") as w:
            w.write("points/xyz", np.zeros((3, 3)))
    assert store.scene_ids() == []


def test_a_scene_without_its_completion_marker_is_not_a_scene(tmp_path):
    """Every array written but not the marker (a writer killed before its last write): the scene is
    not listed, not readable and removed by recovery; a reader that skips the check fails here."""
    store = create_store(tmp_path / "s.zarr", "scannet", None, 0)
    write_scene(store, "scene0000_00")
    write_scene(store, "scene0001_00")
    meta = store.scenes_dir / "scene0001_00" / "zarr.json"
    data = json.loads(meta.read_text())
    del data["attributes"]["complete"]
    meta.write_text(json.dumps(data))
    assert store.scene_ids() == ["scene0000_00"] and store.scene_ids("train") == ["scene0000_00"]
    assert not store.is_complete("scene0001_00") and store.is_complete("scene0000_00")
    assert store.scene_state("scene0001_00", {}) == "incomplete"
    with pytest.raises(InputError, match="no complete scene 'scene0001_00'"):
        store.scene("scene0001_00")
    assert recover_store(store) == ["removed unfinished scene scene0001_00"]
    assert entries(store) == ["scene0000_00"]


def test_scene_state_compares_the_fingerprint(tmp_path):
    store = create_store(tmp_path / "s.zarr", "scannet", None, 0)
    with store.writer("scene0000_00", {"frame_step": 20, "image_size": (320, 240)}) as w:
        w.write("points/xyz", np.zeros((2, 3), np.float32))
        w.commit({"split": "train"})
    write_scene(store, "scene0001_00")  # no fingerprint: made by unknown settings
    assert store.scene_state("scene0000_00", {"frame_step": 20, "image_size": [320, 240]}) == "complete"
    assert store.scene_is_complete("scene0000_00", {"frame_step": 20, "image_size": (320, 240)})
    assert store.scene_state("scene0000_00", {"frame_step": 10, "image_size": [320, 240]}) == "other-settings"
    assert store.changed_settings("scene0000_00", {"frame_step": 10, "image_size": [320, 240]}) == \
        ["frame_step: 20 -> 10"]
    assert store.scene_state("scene0001_00", {"frame_step": 20}) == "other-settings"
    assert store.scene_state("scene0009_00", {"frame_step": 20}) == "missing"
