"""S3DIS with Stanford 2D-3D-S views: reading, frames of reference, store contents, bad input.

The synthetic rooms (`write_s3dis(..., views=True)`) are rebuilt with `s3dis_room(seed, index)`
and their cameras with `room_cameras`, so the checks below compare the store against the
geometry, not against the files the reader parsed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import maximum_filter
from typer.testing import CliRunner

from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_s3dis_room
from preprocessing.s3dis.views import (
    AREAS,
    BadView,
    alignment_transform,
    index_views,
    parse_frame_name,
    read_alignment_angles,
    read_depth,
    read_pose,
    s3dis_area,
)
from preprocessing.synthetic import s3dis_room
from preprocessing.synthetic.s3dis_views import VIEWS_DIR, room_cameras, write_aligned_release
from storage.errors import InputError
from storage.store import open_store

SIZE = 270  # written view size (the real layout is 1080x1080)
ROOMS = {"Area_1_office_1": 0, "Area_5_conferenceRoom_1": 1}  # room id -> synthetic index
TAU = 0.25


def preprocess(raw: Path, views: Path, store: Path, captions: Path | None = None):
    cfg = PreprocessConfig(views=views, captions=captions, show_progress=False)
    listing, cfg = prepare_store("s3dis", raw, store, cfg)
    return {rid: preprocess_s3dis_room(raw, rid, store, cfg, split) for rid, split in listing.items()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from preprocessing.synthetic import write_s3dis

    root = tmp_path_factory.mktemp("s3dis_views")
    write_s3dis(root, rooms=2, seed=0, progress=False, views=True, view_size=SIZE)
    return root


@pytest.fixture(scope="module")
def store(raw, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("s3dis_views_store") / "s3dis.zarr"
    summaries = preprocess(raw, raw, path, captions=raw / VIEWS_DIR / "captions.json")
    assert all(s.status == "written" and s.error is None for s in summaries.values()), summaries
    return path


# --------------------------------------------------------------------------------------- names


def test_frame_names_and_areas():
    f = parse_frame_name("camera_0a4e2a0b2fc74e7b8a83b5d0d5d08e57_conferenceRoom_1_frame_12_domain_rgb.png")
    assert f == {"camera": "0a4e2a0b2fc74e7b8a83b5d0d5d08e57", "room": "conferenceRoom_1", "frame": "12",
                 "domain": "rgb", "ext": "png"}
    assert parse_frame_name("camera_ff_WC_2_frame_0_domain_pose.json")["room"] == "WC_2"
    assert parse_frame_name("office_1_frame_0.png") is None
    assert s3dis_area("area_5a") == s3dis_area("area_5b") == "Area_5"
    assert [s3dis_area(f"area_{n}") for n in (1, 2, 3, 4, 6)] == [f"Area_{n}" for n in (1, 2, 3, 4, 6)]
    for bad in ("area_7", "area_5c", "area_0", "Area_1"):
        with pytest.raises(InputError, match=bad):
            s3dis_area(bad)
    assert len(AREAS) == 7


def test_index_groups_frames_per_room(raw):
    index = index_views(raw)  # the parent of Stanford2d3dDataset_noXYZ is accepted too
    assert sorted(index.rooms) == sorted(ROOMS)
    assert index.skipped == {}
    for room_id, frames in index.rooms.items():
        assert len(frames) == 8
        assert all(f.room_id == room_id and f.rgb.is_file() and f.depth.is_file() for f in frames)
        assert [(f.camera, f.frame) for f in frames] == sorted((f.camera, f.frame) for f in frames)
    assert {f.area_dir for f in index.rooms["Area_5_conferenceRoom_1"]} == {"area_5b"}


# ------------------------------------------------------------------------------ frames of reference


def test_alignment_file_and_transform(tmp_path):
    path = tmp_path / "Area_1_alignmentAngle.txt"
    path.write_text("## Global alignment angle per disjoint space in Area_1 ##\n"
                    "## Disjoint Space Name Global Alignment Angle ##\n"
                    "conferenceRoom_1 0\noffice_1 180\nWC_1 90\n")
    assert read_alignment_angles(path) == {"conferenceRoom_1": 0.0, "office_1": 180.0, "WC_1": 90.0}
    path.write_text("office_1 ninety\n")
    with pytest.raises(InputError, match="line 1"):
        read_alignment_angles(path)
    center = np.array([2.0, 3.0, 1.0])
    T = alignment_transform(90, center)
    assert np.allclose(T @ np.append(center, 1), np.append(center, 1))
    # rotation by -90 degrees about z: +x -> -y
    assert np.allclose(T[:3, :3] @ [1, 0, 0], [0, -1, 0])
    assert np.allclose(alignment_transform(0, center), np.eye(4))


def test_stored_poses_are_the_rendering_cameras(store):
    """Poses come back in the points' frame, including area_5b's own frame."""
    opened = open_store(store)
    for room_id, index in ROOMS.items():
        cameras = sorted(room_cameras(s3dis_room(0, index), 0, index), key=lambda c: (c[0], c[1]))
        scene = opened.scene(room_id)
        assert np.allclose(scene["frames/pose"][:], np.stack([c[2] for c in cameras]), atol=1e-4)
        assert scene.attrs["s3dis_release"] == "raw"


def _geometry_check(scene, geometry):
    """(share of listed points off the surface seen at their pixel, occluded points listed, recall of
    the unoccluded points) over all views of a stored room."""
    xyz = scene["points/xyz"][:].astype(np.float64)
    W, H = scene.attrs["image_size"]
    off = listed_occluded = occluded_total = clear = clear_listed = listed = 0
    for i in range(scene.num_frames):
        pose = scene["frames/pose"][i].astype(np.float64)
        K = scene["frames/intrinsic"][i].astype(np.float64)
        truth = geometry.render(pose, K, W, H, shading=False).depth
        # farthest surface in each pixel's 3x3 neighbourhood: the stored depth was resampled
        # (nearest, 270 -> 240), so at depth edges a pixel may show its neighbour's surface
        farthest = maximum_filter(np.where(np.isfinite(truth), truth, 1e9), size=3)
        w2c = np.linalg.inv(pose)
        cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.rint(cam[:, 0] * K[0, 0] / z + K[0, 2])
            v = np.rint(cam[:, 1] * K[1, 1] / z + K[1, 2])
        m = 8  # the default margin at this width
        inside = (z > 0.05) & (u >= m) & (u < W - m) & (v >= m) & (v < H - m)
        idx = np.flatnonzero(inside)
        D = truth[v[idx].astype(int), u[idx].astype(int)]
        point, uv = scene.view(i)
        is_listed = np.isin(idx, point)
        occluded = z[idx] > farthest[v[idx].astype(int), u[idx].astype(int)] * (1 + TAU) + 0.05
        is_clear = np.abs(z[idx] - D) < 0.02
        listed_occluded += int((is_listed & occluded).sum())
        occluded_total += int(occluded.sum())
        clear += int(is_clear.sum())
        clear_listed += int((is_listed & is_clear).sum())
        D_listed = truth[uv[:, 1].astype(int), uv[:, 0].astype(int)]
        z_listed = (xyz[point] @ w2c[:3, :3].T + w2c[:3, 3])[:, 2]
        off += int((np.abs(D_listed - z_listed) > TAU * D_listed + 0.02).sum())
        listed += len(point)
    assert occluded_total > 1000  # the rooms really hide points behind furniture
    return off / listed, listed_occluded, clear_listed / clear


def test_correspondences_agree_with_geometry(store):
    """Acceptance: visible points lie on the surface the geometry shows; occluded points are not listed."""
    opened = open_store(store)
    for room_id, index in ROOMS.items():
        scene = opened.scene(room_id)
        assert scene.num_frames == 8
        assert scene.attrs["image_size"] == [240, 240]
        assert scene["frames/color"].shape == (8, 240, 240, 3)
        off, occluded, recall = _geometry_check(scene, s3dis_room(0, index).geometry)
        assert off < 0.01, off  # only at depth edges (nearest 270 -> 240 resampling)
        assert occluded == 0, occluded
        assert recall > 0.95, recall
        check = scene.attrs["view_check"]
        assert check["ok"] and check["points_in_views"] > 0.6 and check["free_space"] < 0.01


def test_captions_from_pla_json(store, raw):
    captions = json.loads((raw / VIEWS_DIR / "captions.json").read_text())
    opened = open_store(store)
    for room_id in ROOMS:
        scene = opened.scene(room_id)
        index = scene["frames/index"][:]
        assert list(scene["captions/text"][:]) == [captions[room_id][str(i)] for i in index]
        clip = scene["captions/clip"][:]
        assert clip.shape == (8, opened.attrs["text_dim"]) and np.all(np.abs(clip).sum(1) > 0)
        assert scene.attrs["frames_without_caption"] == []


@pytest.fixture(scope="module")
def aligned(raw, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("s3dis_aligned")
    release = write_aligned_release(raw, out)
    store = out / "aligned.zarr"
    summaries = preprocess(release, raw, store)
    assert all(s.status == "written" and s.error is None for s in summaries.values()), summaries
    return release, store


def test_aligned_release_gives_the_same_correspondences(store, aligned):
    release, aligned_store = aligned
    a, b = open_store(store), open_store(aligned_store)
    for room_id in ROOMS:
        sa, sb = a.scene(room_id), b.scene(room_id)
        assert sb.attrs["s3dis_release"] == "aligned" and sb.attrs["alignment_angle"] in (90.0, 180.0)
        xa, xb = sa["points/xyz"][:], sb["points/xyz"][:]
        assert np.abs(xa - xb).max() > 0.5  # the points really moved
        assert sa.num_frames == sb.num_frames
        for i in range(sa.num_frames):
            pa, pb = set(sa.view(i)[0].tolist()), set(sb.view(i)[0].tolist())
            assert len(pa & pb) / len(pa | pb) > 0.99


def test_wrong_release_is_reported_not_silently_stored(aligned, raw, tmp_path):
    release, _ = aligned
    misnamed = tmp_path / "s3dis_release"  # aligned points, but not under the aligned release's name
    shutil.copytree(release, misnamed)
    summaries = preprocess(misnamed, raw, tmp_path / "wrong.zarr")
    opened = open_store(tmp_path / "wrong.zarr")
    for room_id, summary in summaries.items():
        assert summary.status == "written" and summary.error.startswith("warning:"), summary
        check = opened.scene(room_id).attrs["view_check"]
        assert not check["ok"] and check["free_space"] > check["max_free_space"]


# ------------------------------------------------------------------------------------- bad input


def test_read_pose_and_depth_errors(raw, tmp_path):
    frame = index_views(raw).rooms["Area_1_office_1"][0]
    K, c2w = read_pose(frame.pose)
    assert K.shape == (3, 3) and np.allclose(c2w[3], [0, 0, 0, 1])
    meta = json.loads(frame.pose.read_text())
    del meta["camera_rt_matrix"]
    bad = tmp_path / frame.pose.name
    bad.write_text(json.dumps(meta))
    with pytest.raises(BadView, match=f"{bad.name}.*camera_rt_matrix") as info:
        read_pose(bad)
    assert info.value.reason == "bad_pose"
    eight = tmp_path / frame.depth.name
    Image.fromarray((np.asarray(Image.open(frame.depth)) // 256).astype(np.uint8)).save(eight)
    with pytest.raises(BadView, match=f"{eight.name}.*16-bit") as info:
        read_depth(eight, (240, 240))
    assert info.value.reason == "depth_not_16bit"
    depth, native = read_depth(frame.depth, (240, 240))
    assert native == (SIZE, SIZE) and depth.dtype == np.float32 and 0.3 < depth[depth > 0].mean() < 10


@pytest.fixture(scope="module")
def tampered(raw, tmp_path_factory):
    """A copy of the views with one bad pose, one 8-bit depth, an orphan room and an unknown area."""
    root = tmp_path_factory.mktemp("tampered") / VIEWS_DIR
    shutil.copytree(raw / VIEWS_DIR, root)
    index = index_views(root)
    office, conference = index.rooms["Area_1_office_1"], index.rooms["Area_5_conferenceRoom_1"]
    meta = json.loads(office[0].pose.read_text())
    del meta["camera_rt_matrix"]
    office[0].pose.write_text(json.dumps(meta))
    depth = np.asarray(Image.open(conference[1].depth))
    Image.fromarray((depth // 256).astype(np.uint8)).save(conference[1].depth)
    for domain, src in (("rgb", office[2].rgb), ("depth", office[2].depth), ("pose", office[2].pose)):
        ext = "json" if domain == "pose" else "png"
        shutil.copy(src, src.parent / f"camera_abc_storage_9_frame_0_domain_{domain}.{ext}")
    (root / "area_7" / "data" / "rgb").mkdir(parents=True)
    shutil.copy(office[3].rgb, root / "area_7" / "data" / "rgb" / office[3].rgb.name)
    store = root.parent / "tampered.zarr"
    return root, store, preprocess(raw, root, store)


def test_bad_frames_are_counted_and_rooms_still_stored(tampered):
    _, store, summaries = tampered
    office, conference = summaries["Area_1_office_1"], summaries["Area_5_conferenceRoom_1"]
    assert office.status == conference.status == "written"
    assert office.frames_kept == 7 and office.frames_dropped == {"bad_pose": 1}
    assert conference.frames_kept == 7 and conference.frames_dropped == {"depth_not_16bit": 1}
    opened = open_store(store)
    assert opened.scene("Area_1_office_1").attrs["dropped_frames"] == {"bad_pose": 1}
    assert opened.scene("Area_1_office_1").num_frames == 7
    assert 0 not in opened.scene("Area_1_office_1")["frames/index"][:].tolist()


def test_orphan_rooms_and_unknown_areas_are_counted_skips(tampered, raw):
    root, store, _ = tampered
    index = index_views(root, rooms=ROOMS)
    assert index.skipped == {"no_point_cloud": 1, "unknown_area": 1}
    assert any("Area_1_storage_9" in m for m in index.messages)
    assert any("area_7" in m for m in index.messages)
    assert sorted(open_store(store).scene_ids()) == sorted(ROOMS)


def test_missing_views_dir_is_a_clear_error(raw, tmp_path):
    with pytest.raises(InputError, match="views directory not found"):
        preprocess(raw, tmp_path / "nope", tmp_path / "x.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no area_N"):
        preprocess(raw, tmp_path / "empty", tmp_path / "y.zarr")


# ------------------------------------------------------------------------------ dataset and CLI


@pytest.mark.parametrize("benchmark", ["s3dis-b8n4", "s3dis-b6n6"])
def test_benchmarks_read_the_views(store, benchmark):
    from storage.dataset import SceneViewDataset

    train = SceneViewDataset(store, benchmark, split="train", mode="train")
    val = SceneViewDataset(store, benchmark, split="val", mode="eval")
    assert train.scene_ids == ["Area_1_office_1"] and val.scene_ids == ["Area_5_conferenceRoom_1"]
    sample = val[0]
    assert sample["image"].shape == (3, 240, 320) and len(sample["coord"]) > 400
    assert sample["has_caption"] and sample["caption"].shape == (384,)
    assert set(np.unique(sample["label"])) - {255} <= set(range(len(train.benchmark.class_names)))
    assert len(train[0]["coord"]) > 400


def test_synth_cli_views(tmp_path):
    from xmask3d.cli import app

    result = CliRunner().invoke(app, ["synth", "s3dis", str(tmp_path), "--rooms", "1", "--views",
                                      "--view-size", "32"])
    assert result.exit_code == 0, result.output
    rgb = sorted((tmp_path / VIEWS_DIR / "area_1" / "data" / "rgb").glob("*.png"))
    assert len(rgb) == 8 and Image.open(rgb[0]).size == (32, 32)
    assert (tmp_path / "Stanford3dDataset_v1.2" / "Area_1" / "Area_1_alignmentAngle.txt").is_file()
    bad = CliRunner().invoke(app, ["synth", "s3dis", str(tmp_path / "b"), "--views", "--view-size", "8"])
    assert bad.exit_code == 2 and "view-size" in bad.output and not (tmp_path / "b").exists()


def test_views_off_writes_no_views(tmp_path):
    from preprocessing.synthetic import write_s3dis

    write_s3dis(tmp_path, rooms=1, seed=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Stanford3dDataset_v1.2"]
    assert not list((tmp_path / "Stanford3dDataset_v1.2").rglob("*alignmentAngle.txt"))


@pytest.mark.slow
def test_preprocess_cli_with_views(raw, tmp_path):
    """`xmask3d preprocess s3dis --views` via the Prefect flow; captions default to VIEWS/captions.json."""
    from xmask3d.cli import app

    out = tmp_path / "cli.zarr"
    result = CliRunner().invoke(app, ["preprocess", "s3dis", "--raw", str(raw), "--views", str(raw),
                                      "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "2 written, 0 skipped, 0 failed" in result.output
    opened = open_store(out)
    assert opened.attrs["text_encoder"] is not None
    for room_id in ROOMS:
        scene = opened.scene(room_id)
        assert scene.num_frames == 8 and scene.attrs["captions"].endswith("captions.json")
    bad = CliRunner().invoke(app, ["preprocess", "s3dis", "--raw", str(raw), "--views", str(tmp_path / "no"),
                                   "--out", str(tmp_path / "bad.zarr")])
    assert bad.exit_code == 2 and "views directory not found" in bad.output
