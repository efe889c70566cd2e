"""Preprocessing raw synthetic ScanNet / S3DIS into the store: geometry, captions, bad input, crashes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from preprocessing.pipeline import (
    PreprocessConfig,
    list_scannet_scenes,
    prepare_store,
    preprocess_scannet_scene,
    preprocess_scene_safe,
)
from preprocessing.projection import default_margin, openscene_mapping
from preprocessing.run import run_preprocess
from storage.errors import InputError
from storage.schema import ARRAYS
from storage.store import StoreWriteError, open_store
from xmask3d.cli import app

SCENES = ("scene0000_00", "scene0001_00", "scene0002_00")


EMBEDDINGS = ("captions/clip", "captions/region_clip")


def assert_same_scene(a, b):
    """Two stores hold the same scene: every array and attribute equal (but the caption file's path,
    and the fingerprint's file times and the write token, which differ between runs).

    Text embeddings may differ in the last float16 bit: a text embedded in another batch (one
    table per run instead of one per scene) sums its float32 products in another order.
    """
    skip = {"captions": None, "fingerprint": None, "write_token": None}
    assert {**a.attrs, **skip} == {**b.attrs, **skip}
    for name in ARRAYS:
        assert (name in a) == (name in b), name
        if name in a and name in EMBEDDINGS:
            x, y = a[name][:], b[name][:]
            assert x.dtype == y.dtype == np.float16 and x.shape == y.shape, name
            ulp = np.spacing(np.maximum(np.abs(x), np.abs(y)))
            assert (np.abs(x.astype(np.float32) - y.astype(np.float32)) <= ulp).all(), name
            assert (x == y).mean() > 0.9, name  # most values bit-equal
        elif name in a:
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_store_layout_splits_and_attrs(synthetic_store, synthetic_scannet):
    store = open_store(synthetic_store)
    assert store.attrs["dataset"] == "scannet" and store.attrs["text_encoder"] == "minilm"
    assert store.attrs["text_dim"] == 384 and store.attrs["schema_version"] == 2
    assert store.scene_ids() == list(SCENES)
    assert store.scene_ids("val") == ["scene0002_00"] and store.scene_ids("train") == list(SCENES[:2])
    scene = store.scene("scene0000_00")
    n, f = scene.num_points, scene.num_frames
    assert f >= 5 and n > 1000
    assert scene["points/xyz"].shape == (n, 3) and scene["points/category"].shape == (n,)
    assert scene["frames/color"].shape == (f, 240, 320, 3) and scene["frames/depth"].shape == (f, 240, 320)
    assert scene["frames/index"][:].tolist() == [i for i in range(0, 110, 20) if i != 40]  # 40: lost pose
    assert scene.attrs["dropped_frames"] == {"non_finite_pose": 1}
    assert scene.attrs["frame_step"] == 20
    sizes = scene.attrs["source_files"]
    raw = Path(synthetic_scannet) / "scans" / "scene0000_00"
    assert sizes["scene0000_00.sens"] == (raw / "scene0000_00.sens").stat().st_size
    assert scene.attrs["frames_without_caption"] == []
    captions = json.loads((Path(synthetic_scannet) / "captions.json").read_text())["scene0000_00"]
    texts = scene["captions/text"][:].tolist()
    assert texts == [captions[str(i)] for i in scene["frames/index"][:]]
    clip = scene["captions/clip"][:]
    assert clip.shape == (f, 384) and clip.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(clip.astype(np.float32), axis=1), 1.0, atol=1e-2)


def test_correspondences_follow_the_geometry(synthetic_store):
    """Occluded points are not visible; each scene's own intrinsics are used (acceptance)."""
    from preprocessing.synthetic import scannet_scene

    store = open_store(synthetic_store)
    intrinsics = []
    for index, sid in enumerate(SCENES):
        scene = store.scene(sid)
        truth = scannet_scene(0, index, small=True)
        xyz = scene["points/xyz"][:].astype(np.float64)
        K = scene["frames/intrinsic"][:]
        intrinsics.append(K[0])
        assert np.allclose(K, K[0])
        # per-scene depth intrinsics from the file header, rescaled 160x120 -> 320x240
        k_expected = truth.intrinsic_depth[:3, :3].copy()
        k_expected[:2, :2] *= 2
        k_expected[:2, 2] = (k_expected[:2, 2] + 0.5) * 2 - 0.5
        np.testing.assert_allclose(K[0], k_expected, rtol=1e-5)
        occluded_total = unoccluded_total = occluded_visible = unoccluded_visible = 0
        for v in range(scene.num_frames):
            frame = int(scene["frames/index"][v])
            pose = scene["frames/pose"][v]
            np.testing.assert_allclose(pose, truth.poses[frame], atol=1e-5)
            depth = scene.depth_m(v)
            point, uv = scene.view(v)
            # exactly what OpenScene's mapper says for the stored pose, intrinsics and depth
            ref = openscene_mapping(pose.astype(np.float64), xyz, depth, K[v].astype(np.float64),
                                    default_margin(320))
            idx = np.flatnonzero(ref[:, 2])
            np.testing.assert_array_equal(point, idx)
            np.testing.assert_array_equal(uv[:, ::-1], ref[idx, :2])
            # independent check against the true geometry: cast a ray from the camera to each point
            in_image = np.zeros(len(xyz), bool)
            no_occlusion = openscene_mapping(pose.astype(np.float64), xyz, np.full((240, 320), 1e3),
                                             K[v].astype(np.float64), 10, vis_thres=1.0)
            in_image[np.flatnonzero(no_occlusion[:, 2])] = True
            origin = pose[:3, 3].astype(np.float64)
            hits = truth.geometry.raycast(origin, xyz[in_image] - origin).t
            cand = np.flatnonzero(in_image)
            visible = np.isin(cand, point)
            occluded = hits < 0.6  # something clearly in front of the point
            unoccluded = hits > 0.98
            occluded_total += occluded.sum()
            unoccluded_total += unoccluded.sum()
            occluded_visible += (visible & occluded).sum()
            unoccluded_visible += (visible & unoccluded).sum()
        assert occluded_total > 100 and unoccluded_total > 1000
        assert occluded_visible <= 0.01 * occluded_total, (sid, occluded_visible, occluded_total)
        assert unoccluded_visible >= 0.9 * unoccluded_total, (sid, unoccluded_visible, unoccluded_total)
    assert not np.allclose(intrinsics[0], intrinsics[1]) and not np.allclose(intrinsics[1], intrinsics[2])


def test_same_store_serves_scannet20_and_scannet200(synthetic_store):
    from storage.benchmarks import get_benchmark

    store = open_store(synthetic_store)
    scene = store.scene("scene0000_00")
    b20, b200 = get_benchmark("scannet20-b15n4"), get_benchmark("scannet200-b170n30")
    l20 = b20.map_raw(scene[b20.store_field][:])
    l200 = b200.map_raw(scene[b200.store_field][:])
    assert b20.store_field == "points/nyu40" and b200.store_field == "points/category"
    assert (l20 != 255).mean() > 0.5 and (l200 != 255).mean() > 0.5
    assert len(np.unique(l20[l20 != 255])) >= 3 and len(np.unique(l200[l200 != 255])) >= 3


def test_rerun_skips_complete_scenes_and_overwrite_redoes(synthetic_scannet, synthetic_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(synthetic_store, store)
    cfg = PreprocessConfig(captions=Path(synthetic_scannet) / "captions.json", show_progress=False,
                           region_captions=Path(synthetic_scannet) / "region_captions.json")
    _, cfg = prepare_store("scannet", synthetic_scannet, store, cfg, ["scene0001_00"])
    assert preprocess_scannet_scene(synthetic_scannet, "scene0001_00", store, cfg).status == "skipped"
    cfg = PreprocessConfig(**{**cfg.__dict__, "overwrite": True})
    summary = preprocess_scannet_scene(synthetic_scannet, "scene0001_00", store, cfg)
    assert summary.status == "written" and summary.frames_kept == 5
    assert_same_scene(open_store(store).scene("scene0001_00"),
                      open_store(synthetic_store).scene("scene0001_00"))


def test_captions_none_and_missing_captions(synthetic_scannet, tmp_path):
    raw = Path(synthetic_scannet)
    # a scene missing from the caption JSON is bad input, found before any work starts
    caps = json.loads((raw / "captions.json").read_text())
    del caps["scene0001_00"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(caps))
    with pytest.raises(InputError, match="partial.json: no captions for scene.*scene0001_00"):
        run_preprocess("scannet", raw, tmp_path / "a.zarr", PreprocessConfig(captions=partial))
    assert not (tmp_path / "a.zarr").exists()
    # frames without a caption are listed, not invented
    caps["scene0001_00"] = {"0": "a room", "60": "a chair by a desk"}
    partial.write_text(json.dumps(caps))
    cfg = PreprocessConfig(captions=partial, text_encoder="openclip-tiny", show_progress=False)
    _, cfg = prepare_store("scannet", raw, tmp_path / "b.zarr", cfg, ["scene0001_00"])
    summary = preprocess_scannet_scene(raw, "scene0001_00", tmp_path / "b.zarr", cfg)
    scene = open_store(tmp_path / "b.zarr").scene("scene0001_00")
    assert scene.attrs["frames_without_caption"] == [20, 80, 100] and summary.frames_without_caption == 3
    assert scene["captions/text"][:].tolist() == ["a room", "", "a chair by a desk", "", ""]
    clip = scene["captions/clip"][:]
    assert clip.shape == (5, 64) and not clip[1].any() and clip[0].any()
    # --captions none: no embeddings at all, no encoder recorded
    cfg = PreprocessConfig(captions=None, show_progress=False)
    _, cfg = prepare_store("scannet", raw, tmp_path / "c.zarr", cfg, ["scene0002_00"])
    preprocess_scannet_scene(raw, "scene0002_00", tmp_path / "c.zarr", cfg)
    store = open_store(tmp_path / "c.zarr")
    assert store.attrs["text_encoder"] is None
    assert store.scene("scene0002_00")["captions/clip"].shape == (6, 0)


def test_cli_bad_input_exits_2_and_touches_nothing(synthetic_scannet, tmp_path):
    runner = CliRunner()
    raw = str(synthetic_scannet)
    result = runner.invoke(app, ["preprocess", "scannet", "--raw", raw, "--out", str(tmp_path / "s.zarr"),
                                 "--captions", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "nope.json: caption file not found" in result.output
    target = tmp_path / "file.zarr"
    target.write_text("keep me")
    result = runner.invoke(app, ["preprocess", "scannet", "--raw", raw, "--out", str(target),
                                 "--captions", "none"])
    assert result.exit_code == 2 and "is a file" in result.output and target.read_text() == "keep me"
    import zarr

    old = tmp_path / "old.zarr"
    zarr.open_group(str(old), mode="w").attrs.update({"schema_version": 0, "dataset": "scannet"})
    result = runner.invoke(app, ["preprocess", "scannet", "--raw", raw, "--out", str(old),
                                 "--captions", "none"])
    assert result.exit_code == 2 and "schema version 0" in result.output
    assert sorted(p.name for p in old.iterdir()) == ["zarr.json"]
    result = runner.invoke(app, ["preprocess", "scannet", "--raw", str(tmp_path),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "scans" in result.output


def test_failing_store_write_reports_and_leaves_no_scene(synthetic_scannet, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    cfg = PreprocessConfig(captions=None, show_progress=False)
    store_path = tmp_path / "s.zarr"
    _, cfg = prepare_store("scannet", synthetic_scannet, store_path, cfg, ["scene0000_00"])
    real_set = LocalStore.set

    async def disk_full(self, key, value):
        if "proj/point" in key and "/c/" in key:
            raise OSError(28, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", disk_full)
    with pytest.raises(StoreWriteError, match="scene0000_00 failed.*No space left on device"):
        preprocess_scannet_scene(synthetic_scannet, "scene0000_00", store_path, cfg)
    summary = preprocess_scene_safe("scannet", synthetic_scannet, "scene0000_00", store_path, cfg)
    assert summary.status == "failed" and "No space left on device" in summary.error
    store = open_store(store_path)
    assert store.scene_ids() == []
    assert sorted(p.name for p in store.scenes_dir.iterdir()) == ["zarr.json"]


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from storage.store import SceneWriter
from preprocessing.pipeline import PreprocessConfig, preprocess_scannet_scene
added = SceneWriter.add_frame
def add_then_die(self, color, depth, labels=None):
    added(self, color, depth, labels)
    if self._frames["count"] == 3:
        self._flush_frames()
        os.kill(os.getpid(), signal.SIGKILL)
SceneWriter.add_frame = add_then_die
raw, store = Path(sys.argv[1]), Path(sys.argv[2])
cfg = PreprocessConfig(captions=raw / "captions.json", show_progress=False,
                       region_captions=raw / "region_captions.json")
preprocess_scannet_scene(raw, "scene0001_00", store, cfg, "train")
"""


def test_worker_killed_mid_scene_then_rerun_equals_clean_run(synthetic_scannet, synthetic_store, tmp_path):
    raw = Path(synthetic_scannet)
    store_path = tmp_path / "s.zarr"
    cfg = PreprocessConfig(captions=raw / "captions.json", show_progress=False,
                           region_captions=raw / "region_captions.json")
    listing, cfg = prepare_store("scannet", raw, store_path, cfg, ["scene0001_00"])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(raw), str(store_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    store = open_store(store_path)
    assert (store.scenes_dir / "scene0001_00" / "frames" / "color").is_dir()  # half-written
    assert store.scene_ids() == []  # ... but not a scene
    listing, cfg = prepare_store("scannet", raw, store_path, cfg, ["scene0001_00"])  # its writer is gone
    assert not (store.scenes_dir / "scene0001_00").exists()
    assert not (store.scenes_dir / ".claim-scene0001_00").exists()
    assert preprocess_scannet_scene(raw, "scene0001_00", store_path, cfg, "train").status == "written"
    assert_same_scene(open_store(store_path).scene("scene0001_00"),
                      open_store(synthetic_store).scene("scene0001_00"))


def test_worker_module_imports_neither_torch_nor_prefect():
    """What a Dask worker imports to run a scene (``preprocessing.pipeline``) stays light."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import preprocessing.pipeline"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "preprocessing.pipeline" in imported and "zarr" in imported
    top = {name.split(".")[0] for name in imported}
    heavy = {"torch", "transformers", "sentence_transformers", "open_clip", "prefect", "prefect_dask"}
    assert not top & heavy, sorted(top & heavy)


def test_list_scannet_scenes(synthetic_scannet, tmp_path):
    assert list_scannet_scenes(synthetic_scannet) == {
        "scene0000_00": "train", "scene0001_00": "train", "scene0002_00": "val"}
    with pytest.raises(InputError, match="scans: not found"):
        list_scannet_scenes(tmp_path)


@pytest.mark.slow
def test_cli_dask_run_with_a_failing_scene(synthetic_scannet, synthetic_store, tmp_path):
    """Acceptance: `xmask3d preprocess scannet` on a Dask LocalCluster; a broken scene fails alone,
    the others equal the plain per-scene run; after a fix, a rerun completes only that scene."""
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_scannet, raw)
    sens = raw / "scans" / "scene0001_00" / "scene0001_00.sens"
    good = sens.read_bytes()
    sens.write_bytes(good[: len(good) // 2])  # truncated download
    out = tmp_path / "s.zarr"
    args = ["preprocess", "scannet", "--raw", str(raw), "--out", str(out), "--workers", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "scene0001_00" in result.output and "failed" in result.output and "truncated" in result.output
    store = open_store(out)
    assert store.scene_ids() == ["scene0000_00", "scene0002_00"]
    for sid in store.scene_ids():
        assert_same_scene(store.scene(sid), open_store(synthetic_store).scene(sid))
    sens.write_bytes(good)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 written, 2 skipped, 0 failed" in result.output
    assert_same_scene(open_store(out).scene("scene0001_00"),
                      open_store(synthetic_store).scene("scene0001_00"))


@pytest.mark.slow
def test_cli_preprocess_s3dis(synthetic_s3dis, tmp_path):
    from preprocessing.s3dis.reader import read_s3dis_room

    out = tmp_path / "s3dis.zarr"
    result = CliRunner().invoke(app, ["preprocess", "s3dis", "--raw", str(synthetic_s3dis), "--out", str(out),
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert store.attrs["dataset"] == "s3dis"
    assert store.scene_ids() == ["Area_1_hallway_1", "Area_1_office_1", "Area_5_conferenceRoom_1"]
    assert store.scene_ids("val") == ["Area_5_conferenceRoom_1"]
    scene = store.scene("Area_1_office_1")
    room = read_s3dis_room(Path(synthetic_s3dis) / "Stanford3dDataset_v1.2" / "Area_1" / "office_1")
    np.testing.assert_array_equal(scene["points/xyz"][:], room.xyz)
    np.testing.assert_array_equal(scene["points/label"][:], room.label)
    assert scene.num_frames == 0 and scene["proj/offsets"][:].tolist() == [0]
    assert "points/nyu40" not in scene
