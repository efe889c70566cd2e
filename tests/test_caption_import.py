"""Importing released PLA / RegionPLC caption files: restricted unpickling, pairing, round trips."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from preprocessing.caption_import import (
    import_captions,
    load_caption_json,
    safe_load_index_pickle,
    write_pla_files,
    write_regionplc_files,
)
from storage.errors import InputError
from storage.regions import RegionCaptions
from storage.store import create_store, open_store, store_lock
from xmask3d.cli import app

NUM_POINTS = 60
FRAME_NUMBERS = [0, 100, 200]  # frames/index of every test scene


def write_scene(store, scene_id, seed=0, H=12, W=16):
    """A small complete scene: 60 points, three frames (ScanNet frames 0, 100, 200)."""
    rng = np.random.default_rng(seed)
    with store.writer(scene_id) as w:
        w.write("points/xyz", rng.normal(size=(NUM_POINTS, 3)).astype(np.float32))
        w.write("points/rgb", rng.integers(0, 255, (NUM_POINTS, 3), dtype=np.uint8))
        w.begin_frames(len(FRAME_NUMBERS), (W, H))
        for i in range(len(FRAME_NUMBERS)):
            w.add_frame(np.full((H, W, 3), i, np.uint8), np.full((H, W), 1000, np.uint16))
        n = w.end_frames()
        w.write("frames/index", np.array(FRAME_NUMBERS, np.int32))
        w.write("proj/offsets", np.array([0, 2, 4, 5], np.int64))
        w.write("proj/point", np.array([1, 7, 0, 3, 4], np.int32))
        w.write("proj/uv", np.arange(10, dtype=np.uint16).reshape(5, 2))
        w.write("captions/text", np.array(["a room", "", "a desk"]))
        w.write("captions/clip", np.zeros((n, 384), np.float16))
        w.commit({"split": "train", "num_frames": n, "num_points": NUM_POINTS, "depth_scale": 1000.0})


def make_store(path, scenes=("scene0000_00", "scene0001_00")):
    store = create_store(path, "scannet", "minilm", 384)
    for i, scene_id in enumerate(scenes):
        write_scene(store, scene_id, seed=i)
    return store


@pytest.fixture(scope="module")
def encoder():
    from preprocessing.text import build_text_encoder

    return build_text_encoder("minilm")


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


class RunsShell:
    """Pickles as a call to os.system (global posix.system): what a hostile index file holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


class StorageWithShell:
    """A 'tensor storage' whose bytes are a hostile pickle: torch.load(weights_only=True) refuses it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import torch.storage

        return torch.storage._load_from_bytes, (pickle.dumps(RunsShell(self.marker), protocol=2),)


def test_hostile_pickles_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = dump(tmp_path / "idx.pkl", {"scene0000_00": {"000100_0": RunsShell(marker)}})
    with pytest.raises(InputError, match=r"refusing to unpickle posix\.system \(only dicts, lists and integer"
                       ) as info:
        safe_load_index_pickle(path)
    assert str(path) in str(info.value)
    path = dump(tmp_path / "eval.pkl", [RunsEval()])
    with pytest.raises(InputError, match=r"refusing to unpickle builtins\.eval"):
        safe_load_index_pickle(path)
    path = dump(tmp_path / "storage.pkl", {"scene0000_00": {"entity_0": StorageWithShell(marker)}})
    with pytest.raises(InputError, match="refusing to unpickle"):
        safe_load_index_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("value, message", [
    (np.array([0.5, 1.5]), "index array has dtype float64, expected integers"),
    (torch.tensor([0.5]), "index tensor has dtype torch.float32"),
    (np.array([[1, 2]], np.int32), r"expected a 1-D index array, got shape \(1, 2\)"),
    ([1, 2], "expected an integer index array, got list"),
])
def test_non_integer_or_non_1d_index_arrays_are_refused(tmp_path, value, message):
    path = dump(tmp_path / "idx.pkl", {"scene0000_00": {"000100_0": value}})
    with pytest.raises(InputError, match=message) as info:
        safe_load_index_pickle(path)
    assert all(part in str(info.value) for part in (str(path), "scene0000_00", "000100_0"))


def test_corrupt_and_malformed_pickles(tmp_path):
    good = pickle.dumps({"scene0000_00": {"000100_0": np.arange(5, dtype=np.int32)}})
    path = tmp_path / "cut.pkl"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="truncated or corrupt index pickle") as info:
        safe_load_index_pickle(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match="index pickle not found"):
        safe_load_index_pickle(tmp_path / "none.pkl")
    with pytest.raises(InputError, match="expected .* or a list"):
        safe_load_index_pickle(dump(tmp_path / "int.pkl", 3))
    with pytest.raises(InputError, match="list item 0 is not"):
        safe_load_index_pickle(dump(tmp_path / "list.pkl", [{"infos": {}}]))
    with pytest.raises(InputError, match="listed twice"):
        safe_load_index_pickle(dump(tmp_path / "twice.pkl", [{"scene_name": "a", "infos": {}}] * 2))


def test_both_forms_and_protocols_load(tmp_path):
    infos = {"000100_0": np.array([3, 1], np.int32), "app_0_0": np.array([5], np.int64)}
    listed = [{"scene_name": "scene0000_00", "infos": infos,
               "boxes": {"000100": np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)}}]
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(listed, protocol=protocol))
        out = safe_load_index_pickle(path)
        assert list(out) == ["scene0000_00"] and list(out["scene0000_00"]) == ["000100_0", "app_0_0"]
        assert out["scene0000_00"]["000100_0"].tolist() == [3, 1]
    # numpy 1.x (which wrote the released files) names the module numpy.core.multiarray
    old = pickle.dumps(listed, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in old
    (tmp_path / "old.pkl").write_bytes(old)
    assert safe_load_index_pickle(tmp_path / "old.pkl")["scene0000_00"]["app_0_0"].tolist() == [5]
    pla = {"scene0000_00": {"000100": torch.IntTensor([4, 2, 9]), "000200": torch.LongTensor([1])}}
    for protocol in (2, 4):
        path = tmp_path / f"pla{protocol}.pkl"
        path.write_bytes(pickle.dumps(pla, protocol=protocol))
        out = safe_load_index_pickle(path)["scene0000_00"]
        assert out["000100"].dtype == np.int32 and out["000100"].tolist() == [4, 2, 9]
        assert out["000200"].tolist() == [1]


@pytest.mark.parametrize("content, message", [
    (None, "caption file not found"),
    ("{oops", "not a valid caption JSON"),
    ("[]", "expected an object"),
    ('{"scene0000_00": "one summary"}', "scene-level caption"),
    ('{"scene0000_00": {"000100_0": 7}}', "key '000100_0': caption is not a string"),
])
def test_bad_caption_json(tmp_path, content, message):
    path = tmp_path / "caps.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_caption_json(path)
    assert str(path) in str(info.value)


def test_regionplc_round_trip(tmp_path, encoder):
    store_a = make_store(tmp_path / "a.zarr")
    make_store(tmp_path / "b.zarr")
    texts = ["a wooden chair", "a kitchen counter", "a lamp"]
    sets = [np.array([5, 3, 3, 9]), np.array([0, 1, 2]), np.array([59])]
    regions = RegionCaptions.from_sets(texts, sets, np.zeros((3, 384), np.float16),
                                       frame=np.array([1, 1, -1], np.int32),
                                       box=np.array([[1, 2, 5, 6], [0, 0, 3, 3], [np.nan] * 4], np.float32))
    store_a.add_region_captions("scene0001_00", regions, {"format": "test"})

    json_path, pkl_path = write_regionplc_files(tmp_path / "a.zarr", tmp_path / "files")
    caps = json.loads(json_path.read_text())
    assert caps == {"scene0001_00": {"000100_0": "a wooden chair", "000100_1": "a kitchen counter",
                                     "app_0_0": "a lamp"}}
    with open(pkl_path, "rb") as f:
        records = pickle.load(f)
    assert records[0]["scene_name"] == "scene0001_00" and records[0]["infos"]["000100_0"].dtype == np.int32
    assert records[0]["boxes"]["000100"].tolist() == [[2, 1, 6, 5], [0, 0, 3, 3]]  # [y0, x0, y1, x1]

    summary = import_captions(tmp_path / "b.zarr", "regionplc", json_path, pkl_path, text_encoder=encoder)
    assert [(s.scene_id, s.status, s.regions, s.with_frame) for s in summary.scenes] == [
        ("scene0000_00", "missing", 0, 0), ("scene0001_00", "imported", 3, 2)]
    scene_b = open_store(tmp_path / "b.zarr").scene("scene0001_00")
    got = scene_b.region_captions()
    assert got.text == texts
    for i in range(3):
        assert got.points_of(i).tolist() == regions.points_of(i).tolist()
    assert got.frame.tolist() == [1, 1, -1] and np.isnan(got.box).all()
    np.testing.assert_allclose(got.clip[0].astype(np.float32), encoder.encode(["a wooden chair"])[0].numpy(),
                               atol=2e-3)
    assert scene_b.attrs["region_captions"] == {"format": "regionplc", "captions": json_path.name,
                                                "index": pkl_path.name, "count": 3}
    assert not open_store(tmp_path / "b.zarr").scene("scene0000_00").has_region_captions
    assert "1 scenes imported (3 regions, minilm)" in summary.table()


def test_pla_dict_form_with_int_tensors(tmp_path, encoder):
    store = make_store(tmp_path / "s.zarr")
    caps = {"scene0000_00": {"000100": "a desk and a chair", "000300": "a sofa", "000200": "a bed"},
            "scene0099_00": {"000000": "not in the store"}}
    index = {"scene0000_00": {"000100": torch.IntTensor([1, 2, 3]), "000300": torch.IntTensor([4]),
                              "000200": torch.IntTensor([])},
             "scene0099_00": {"000000": torch.IntTensor([0])}}
    (tmp_path / "view.json").write_text(json.dumps(caps))
    dump(tmp_path / "view.pickle", index)
    summary = import_captions(store.path, "pla", tmp_path / "view.json", tmp_path / "view.pickle",
                              text_encoder="minilm")
    row = summary.scenes[0]
    assert (row.status, row.regions, row.with_frame, row.empty) == ("imported", 2, 1, 1)
    assert summary.not_in_store == ["scene0099_00"]
    got = open_store(store.path).scene("scene0000_00").region_captions()
    assert got.text == ["a desk and a chair", "a sofa"] and got.frame.tolist() == [1, -1]  # 300 not kept

    # and the inverse writer produces the same dict form
    with pytest.raises(InputError, match="not tied to a frame"):
        write_pla_files(store.path, tmp_path / "out", level="view")
    json_path, pkl_path = write_pla_files(store.path, tmp_path / "out", level="entity")
    assert json.loads(json_path.read_text()) == {"scene0000_00": {"entity_0": "a desk and a chair",
                                                                  "entity_1": "a sofa"}}
    with open(pkl_path, "rb") as f:
        written = pickle.load(f)
    assert written["scene0000_00"]["entity_0"].dtype == torch.int32
    assert safe_load_index_pickle(pkl_path)["scene0000_00"]["entity_1"].tolist() == [4]


def test_mismatched_keys_are_counted_not_fatal(tmp_path, encoder):
    store = make_store(tmp_path / "s.zarr")
    caps = {"scene0000_00": {"000100_0": "a chair", "000100_1": "a box that lost its points",
                             "000200_0": "  ", "app_0_0": "a rug"}}
    index = [{"scene_name": "scene0000_00",
              "infos": {"000100_0": np.array([1, 2], np.int32), "000200_0": np.array([3], np.int32),
                        "app_0_0": np.array([4], np.int32), "000200_1": np.array([5], np.int32)}}]
    (tmp_path / "c.json").write_text(json.dumps(caps))
    dump(tmp_path / "i.pkl", index)
    summary = import_captions(store.path, "regionplc", tmp_path / "c.json", tmp_path / "i.pkl",
                              text_encoder=encoder)
    row = summary.scenes[0]
    assert (row.regions, row.no_index, row.no_caption, row.blank) == (2, 1, 1, 1)
    assert [s.status for s in summary.scenes] == ["imported", "missing"]
    assert open_store(store.path).scene("scene0000_00").region_captions().text == ["a chair", "a rug"]


def test_bad_imports_write_nothing(tmp_path, encoder):
    store = make_store(tmp_path / "s.zarr")
    (tmp_path / "c.json").write_text(json.dumps({"scene0000_00": {"000100_0": "a"},
                                                 "scene0001_00": {"000100_0": "b"}}))
    dump(tmp_path / "ok.pkl", {"scene0000_00": {"000100_0": np.array([1], np.int32)},
                               "scene0001_00": {"000100_0": np.array([0, NUM_POINTS], np.int32)}})
    with pytest.raises(InputError, match=r"ok\.pkl: scene 'scene0001_00' key '000100_0': point index 60 "
                                         r"out of range 0\.\.59"):
        import_captions(store.path, "regionplc", tmp_path / "c.json", tmp_path / "ok.pkl",
                        text_encoder=encoder)
    assert not open_store(store.path).scene("scene0000_00").has_region_captions  # checked before writing
    dump(tmp_path / "other.pkl", {"scene0999_00": {"000100_0": np.array([1], np.int32)}})
    with pytest.raises(InputError, match="other.pkl: names none of the store's 2 scenes"):
        import_captions(store.path, "regionplc", tmp_path / "c.json", tmp_path / "other.pkl",
                        text_encoder=encoder)
    with pytest.raises(InputError, match="unknown caption format"):
        import_captions(store.path, "openscene", tmp_path / "c.json", tmp_path / "ok.pkl")
    with pytest.raises(InputError, match="is openclip-tiny .* but the store's captions use minilm"):
        import_captions(store.path, "pla", tmp_path / "c.json", tmp_path / "ok.pkl",
                        text_encoder="openclip-tiny")


def test_cli_import_and_missing_file(tmp_path):
    store = make_store(tmp_path / "s.zarr", scenes=("scene0000_00",))
    runner = CliRunner()
    command = ["import-captions", "--store", str(store.path), "--format", "regionplc"]
    result = runner.invoke(app, [*command, "--captions", str(tmp_path / "none.json"),
                                 "--index", str(tmp_path / "i.pkl")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'none.json'}: caption file not found"]

    (tmp_path / "c.json").write_text(json.dumps({"scene0000_00": {"000200_0": "a desk"}}))
    infos = {"000200_0": np.array([7, 8], np.int32)}
    dump(tmp_path / "i.pkl", [{"scene_name": "scene0000_00", "infos": infos}])
    result = runner.invoke(app, [*command, "--captions", str(tmp_path / "c.json"),
                                 "--index", str(tmp_path / "i.pkl")])
    assert result.exit_code == 0, result.output
    assert "scene0000_00" in result.output and "1 scenes imported (1 regions, minilm)" in result.output
    assert open_store(store.path).scene("scene0000_00").region_captions().frame.tolist() == [2]


def test_import_is_refused_while_a_preprocessing_run_holds_the_store(tmp_path, encoder):
    store = make_store(tmp_path / "s.zarr")
    (tmp_path / "c.json").write_text(json.dumps({"scene0000_00": {"app_0_0": "a rug"}}))
    dump(tmp_path / "i.pkl", [{"scene_name": "scene0000_00", "infos": {"app_0_0": np.array([4], np.int32)}}])
    args = (store.path, "regionplc", tmp_path / "c.json", tmp_path / "i.pkl")
    with store_lock(store.path, "preprocess scannet"):
        with pytest.raises(InputError, match="preprocess scannet"):
            import_captions(*args, text_encoder=encoder)
        command = ["import-captions", "--store", str(store.path), "--format", "regionplc",
                   "--captions", str(args[2]), "--index", str(args[3]), "--lock-wait", "0.2"]
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2
        assert len(result.output.strip().splitlines()) == 1
        assert "writer lock is held" in result.output and "preprocess scannet" in result.output
    assert not open_store(store.path).scene("scene0000_00").has_region_captions
    import_captions(*args, text_encoder=encoder)
    assert open_store(store.path).scene("scene0000_00").region_captions().text == ["a rug"]
