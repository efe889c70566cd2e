"""Synthetic raw datasets: the files are checked with independent parsers (struct, zlib, Pillow,
plyfile, csv), not with the writer's own code, and the rendered frames are checked against the mesh.
"""

from __future__ import annotations

import csv
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plyfile import PlyData
from scipy.spatial import cKDTree
from typer.testing import CliRunner

SCENES = ("scene0000_00", "scene0001_00", "scene0002_00")
TSV_HEADER = ["id", "raw_category", "category", "count", "nyu40id", "eigen13id", "nyuClass", "nyu40class",
              "eigen13class", "ModelNet40", "ModelNet10", "ShapeNetCore55", "synsetoffset", "wnsynsetid",
              "wnsynsetkey", "mpcat40", "mpcat40index"]


# ---------------------------------------------------------------------------------------------
# independent readers
def read_sens(path: Path, decode: set[int] | frozenset = frozenset()) -> dict:
    """Parse a .sens file with struct: header, every frame's pose and sizes, the IMU block."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    (version,) = take("<I")
    (name_len,) = take("<Q")
    name = data[pos:pos + name_len].decode()
    pos += name_len
    mats = [np.array(take("<16f"), dtype=np.float64).reshape(4, 4) for _ in range(4)]
    color_comp, depth_comp, cw, ch, dw, dh, shift = take("<iiIIIIf")
    (num_frames,) = take("<Q")
    frames = []
    for i in range(num_frames):
        pose = np.array(take("<16f"), dtype=np.float64).reshape(4, 4)
        ts_c, ts_d, c_size, d_size = take("<QQQQ")
        frame = {"pose": pose, "timestamps": (ts_c, ts_d)}
        if i in decode:
            frame["color"] = np.asarray(Image.open(io.BytesIO(data[pos:pos + c_size])).convert("RGB"))
            raw = zlib.decompress(data[pos + c_size:pos + c_size + d_size])
            frame["depth"] = np.frombuffer(raw, dtype="<u2").reshape(dh, dw)
        pos += c_size + d_size
        frames.append(frame)
    (num_imu,) = take("<Q")
    imu_end = pos + 128 * num_imu
    return {"version": version, "sensor": name, "intrinsic_color": mats[0], "extrinsic_color": mats[1],
            "intrinsic_depth": mats[2], "extrinsic_depth": mats[3], "color_compression": color_comp,
            "depth_compression": depth_comp, "color_size": (cw, ch), "depth_size": (dw, dh),
            "depth_shift": shift, "frames": frames, "num_imu": num_imu, "trailing_bytes": len(data) - imu_end,
            "imu_gravity_z": struct.unpack_from("<d", data, pos + 4 * 24 + 16)[0] if num_imu else None}


def read_meta(path: Path) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in Path(path).read_text().splitlines() if " = " in line)


def read_tsv(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(root / "scannetv2-labels.combined.tsv", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        return list(reader.fieldnames), list(reader)


def vertex_categories(scene_dir: Path, n_vertices: int) -> np.ndarray:
    """Raw category name per vertex through segs.json + aggregation.json ('' = unannotated)."""
    sid = scene_dir.name
    seg = np.array(json.loads((scene_dir / f"{sid}_vh_clean_2.0.010000.segs.json").read_text())["segIndices"])
    assert len(seg) == n_vertices
    names = np.full(n_vertices, "", dtype=object)
    for group in json.loads((scene_dir / f"{sid}.aggregation.json").read_text())["segGroups"]:
        names[np.isin(seg, group["segments"])] = group["label"]
    return names


def project(xyz: np.ndarray, pose: np.ndarray, k: np.ndarray):
    """World points -> (u, v, z) in a camera with camera_to_world `pose` and intrinsics `k`."""
    cam = (xyz - pose[:3, 3]) @ pose[:3, :3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = k[0, 0] * cam[:, 0] / z + k[0, 2]
        v = k[1, 1] * cam[:, 1] / z + k[1, 2]
    return u, v, z


def visible_vertices(xyz, pose, k, depth_mm, tol=0.05):
    """Indices of vertices whose depth agrees with the depth image (and those occluded by > 0.2 m)."""
    h, w = depth_mm.shape
    u, v, z = project(xyz, pose, k)
    inside = (z > 0.1) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    idx = np.flatnonzero(inside)
    d = depth_mm[np.rint(v[idx]).astype(int), np.rint(u[idx]).astype(int)] / 1000.0
    valid = d > 0
    visible = idx[valid & (np.abs(d - z[idx]) < tol * np.maximum(z[idx], 1.0))]
    occluded = idx[valid & (z[idx] > d + 0.2)]
    return visible, occluded


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sens0(synthetic_scannet: Path) -> dict:
    return read_sens(synthetic_scannet / "scans" / SCENES[0] / f"{SCENES[0]}.sens", decode={0, 20, 60})


@pytest.fixture(scope="module")
def mesh0(synthetic_scannet: Path):
    scene_dir = synthetic_scannet / "scans" / SCENES[0]
    ply = PlyData.read(str(scene_dir / f"{SCENES[0]}_vh_clean_2.ply"))
    labels = PlyData.read(str(scene_dir / f"{SCENES[0]}_vh_clean_2.labels.ply"))
    return ply, labels


def test_layout_and_splits(synthetic_scannet: Path):
    root = synthetic_scannet
    for sid in SCENES:
        names = sorted(p.name for p in (root / "scans" / sid).iterdir())
        expected = [f"{sid}.sens", f"{sid}_vh_clean_2.ply", f"{sid}_vh_clean_2.labels.ply",
                    f"{sid}_vh_clean_2.0.010000.segs.json", f"{sid}.aggregation.json", f"{sid}.txt",
                    f"{sid}_2d-label-filt.zip"]
        assert names == sorted(expected)
    assert sorted(p.name for p in (root / "scans").iterdir()) == list(SCENES)  # no temporary dirs left
    assert (root / "scannetv2_train.txt").read_text().split() == list(SCENES[:2])
    assert (root / "scannetv2_val.txt").read_text().split() == [SCENES[2]]


def test_sens_header_frames_and_imu(synthetic_scannet: Path, sens0: dict):
    s = sens0
    assert s["version"] == 4 and s["sensor"]
    assert s["color_compression"] == 2 and s["depth_compression"] == 1
    assert s["color_size"] == (320, 240) and s["depth_size"] == (160, 120)
    assert s["depth_shift"] == 1000.0
    np.testing.assert_allclose(s["extrinsic_color"], np.eye(4))
    n = len(s["frames"])
    assert n >= 100
    assert s["num_imu"] > 0 and s["trailing_bytes"] == 0  # the IMU block ends the file exactly
    assert s["imu_gravity_z"] == pytest.approx(-1.0, abs=0.1)
    meta = read_meta(synthetic_scannet / "scans" / SCENES[0] / f"{SCENES[0]}.txt")
    assert int(meta["numColorFrames"]) == int(meta["numDepthFrames"]) == n
    assert int(meta["numIMUmeasurements"]) == s["num_imu"]
    assert float(meta["fx_depth"]) == pytest.approx(s["intrinsic_depth"][0, 0], rel=1e-5)
    assert float(meta["my_color"]) == pytest.approx(s["intrinsic_color"][1, 2], rel=1e-5)
    assert int(meta["colorWidth"]) == 320 and int(meta["depthHeight"]) == 120
    stamps = np.array([f["timestamps"][0] for f in s["frames"]])
    assert np.all(np.diff(stamps.astype(np.int64)) > 0)
    frame = s["frames"][0]
    assert frame["color"].shape == (240, 320, 3) and frame["depth"].shape == (120, 160)
    assert frame["depth"].dtype == np.uint16
    valid = frame["depth"][frame["depth"] > 0]
    assert valid.size > 0.95 * frame["depth"].size and 300 < valid.min() and valid.max() < 12000
    assert frame["color"].std() > 10  # not a blank image


def test_lost_tracking_frames(synthetic_scannet: Path):
    for sid in SCENES:
        frames = read_sens(synthetic_scannet / "scans" / sid / f"{sid}.sens")["frames"]
        bad = [i for i, f in enumerate(frames) if not np.all(np.isfinite(f["pose"]))]
        assert bad, f"{sid} has no frame with a -inf pose"
        assert all(np.all(np.isneginf(frames[i]["pose"])) for i in bad)
        kept = [i for i in range(0, len(frames), 20) if i not in bad]
        assert len(kept) >= 5
        for i in kept:  # finite poses are rigid
            r = frames[i]["pose"][:3, :3]
            np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-4)


def test_intrinsics_differ_between_scenes(synthetic_scannet: Path):
    headers = [read_sens(synthetic_scannet / "scans" / sid / f"{sid}.sens") for sid in SCENES]
    depth = {(round(h["intrinsic_depth"][0, 0], 3), round(h["intrinsic_depth"][0, 2], 3)) for h in headers}
    assert len(depth) == len(SCENES)
    for h in headers:
        kc, kd = h["intrinsic_color"], h["intrinsic_depth"]
        # same field of view roughly, different calibrations: color is not depth scaled exactly
        assert kc[0, 0] / 320 == pytest.approx(kd[0, 0] / 160, rel=0.05)
        assert not np.allclose(kc[:2, :3] / 2, kd[:2, :3])


def test_mesh_plys(mesh0, synthetic_scannet: Path):
    ply, labels = mesh0
    assert ply.elements[0].name == "vertex" and ply.elements[1].name == "face"
    assert [p.name for p in ply["vertex"].properties] == ["x", "y", "z", "red", "green", "blue", "alpha"]
    assert [p.name for p in labels["vertex"].properties][-1] == "label"
    assert labels["vertex"]["label"].dtype == np.uint16
    assert not ply.text and ply.byte_order == "<"
    n = ply["vertex"].count
    assert 15_000 <= n <= 40_000
    faces = np.stack(ply["face"]["vertex_indices"])
    assert faces.shape[1] == 3 and faces.min() >= 0 and faces.max() < n
    for axis in "xyz":
        np.testing.assert_array_equal(ply["vertex"][axis], labels["vertex"][axis])
    # labels.ply agrees with segs + aggregation + the label TSV (the way ScanNet derives it)
    _, rows = read_tsv(synthetic_scannet)
    nyu_of = {r["raw_category"]: int(r["nyu40id"]) for r in rows}
    names = vertex_categories(synthetic_scannet / "scans" / SCENES[0], n)
    expected = np.array([nyu_of.get(c, 0) for c in names])
    np.testing.assert_array_equal(labels["vertex"]["label"], expected)
    assert (expected == 0).sum() < 0.2 * n


def test_label_tsv(synthetic_scannet: Path):
    from storage.benchmarks import get_benchmark

    header, rows = read_tsv(synthetic_scannet)
    assert header == TSV_HEADER
    ids = {r["raw_category"]: int(r["id"]) for r in rows}
    bench = get_benchmark("scannet200-b170n30")
    official = dict(zip(bench.class_names, bench.source_ids, strict=True))
    shared = [c for c in ids if c in official]
    assert len(shared) >= 40
    assert all(ids[c] == official[c] for c in shared)
    nyu = {r["raw_category"]: int(r["nyu40id"]) for r in rows}
    assert nyu["couch"] == 6 and nyu["office chair"] == 5 and nyu["kitchen cabinet"] == 3
    assert nyu["ceiling"] == 22 and nyu["trash can"] == 39
    # every category used by an aggregation file is in the TSV
    for sid in SCENES:
        agg = json.loads((synthetic_scannet / "scans" / sid / f"{sid}.aggregation.json").read_text())
        assert {g["label"] for g in agg["segGroups"]} <= set(ids)


def test_classes_cover_scannet20_and_some_scannet200(synthetic_scannet: Path):
    from storage.benchmarks import get_benchmark

    labels, categories = set(), set()
    for sid in SCENES:
        ply = PlyData.read(str(synthetic_scannet / "scans" / sid / f"{sid}_vh_clean_2.labels.ply"))
        labels |= set(np.unique(ply["vertex"]["label"]).tolist())
        agg = json.loads((synthetic_scannet / "scans" / sid / f"{sid}.aggregation.json").read_text())
        categories |= {g["label"] for g in agg["segGroups"]}
    assert set(get_benchmark("scannet20-b15n4").source_ids) | {39} <= labels
    scannet200 = set(get_benchmark("scannet200-b170n30").class_names)
    assert len(categories & scannet200) >= 35
    assert {"office chair", "couch", "monitor", "kitchen cabinet"} & categories


def test_axis_alignment(synthetic_scannet: Path, mesh0):
    ply, _ = mesh0
    meta = read_meta(synthetic_scannet / "scans" / SCENES[0] / f"{SCENES[0]}.txt")
    m = np.array(meta["axisAlignment"].split(), dtype=np.float64).reshape(4, 4)
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-5)
    xyz = np.stack([ply["vertex"][a] for a in "xyz"], 1).astype(np.float64)
    aligned = xyz @ m[:3, :3].T + m[:3, 3]
    assert aligned[:, 2].min() == pytest.approx(0.0, abs=1e-3)  # floor at z = 0
    lo, hi = aligned.min(0), aligned.max(0)
    np.testing.assert_allclose((lo + hi)[:2] / 2, 0.0, atol=1e-3)  # centred room, walls on the axes
    # after alignment the walls are axis-parallel: most vertices sit on the bounding box faces in x or y
    on_walls = (np.abs(aligned[:, 0] - lo[0]) < 1e-3) | (np.abs(aligned[:, 0] - hi[0]) < 1e-3)
    assert on_walls.sum() > 500


def test_depth_agrees_with_mesh(sens0: dict, mesh0):
    """Back-projected depth lands on the mesh surface; the mesh reprojects onto the depth."""
    ply, _ = mesh0
    xyz = np.stack([ply["vertex"][a] for a in "xyz"], 1).astype(np.float64)
    tree = cKDTree(xyz)
    k = sens0["intrinsic_depth"]
    rng = np.random.default_rng(0)
    for i in (0, 20, 60):
        frame = sens0["frames"][i]
        depth, pose = frame["depth"], frame["pose"]
        v, u = np.nonzero(depth)
        pick = rng.choice(len(u), 400, replace=False)
        u, v = u[pick], v[pick]
        z = depth[v, u] / 1000.0
        cam = np.stack([(u - k[0, 2]) / k[0, 0] * z, (v - k[1, 2]) / k[1, 1] * z, z], 1)
        world = cam @ pose[:3, :3].T + pose[:3, 3]
        dist, _ = tree.query(world)
        # grid spacing 0.085 m: nearest vertex within half a cell diagonal (+ depth noise)
        assert np.median(dist) < 0.05 and np.quantile(dist, 0.95) < 0.08, (i, np.quantile(dist, [0.5, 0.95]))
        visible, occluded = visible_vertices(xyz, pose, k, depth)
        assert len(visible) > 1000
        assert len(occluded) > 100  # real occlusion: vertices in view but behind nearer surfaces


def test_color_agrees_with_mesh_colours(sens0: dict, mesh0):
    ply, _ = mesh0
    xyz = np.stack([ply["vertex"][a] for a in "xyz"], 1).astype(np.float64)
    rgb = np.stack([ply["vertex"][c] for c in ("red", "green", "blue")], 1).astype(np.float64)
    frame = sens0["frames"][20]
    visible, _ = visible_vertices(xyz, frame["pose"], sens0["intrinsic_depth"], frame["depth"], tol=0.02)
    u, v, _ = project(xyz[visible], frame["pose"], sens0["intrinsic_color"])
    ok = (u >= 1) & (u <= 318) & (v >= 1) & (v <= 238)
    pixels = frame["color"][np.rint(v[ok]).astype(int), np.rint(u[ok]).astype(int)].astype(np.float64)
    diff = np.abs(pixels - rgb[visible][ok]).mean(1)
    assert np.median(diff) < 20, np.median(diff)


def test_captions_name_visible_objects(synthetic_scannet: Path):
    from preprocessing.synthetic.categories import CATEGORIES

    captions = json.loads((synthetic_scannet / "captions.json").read_text())
    assert sorted(captions) == list(SCENES)
    # phrase -> categories it may refer to (synonyms shared between categories are allowed)
    phrases: dict[str, set[str]] = {}
    for cat in CATEGORIES.values():
        for singular, plural in cat.words:
            phrases.setdefault(singular, set()).add(cat.name)
            phrases.setdefault(plural, set()).add(cat.name)
    ordered = sorted(phrases, key=len, reverse=True)
    all_text = " ".join(t for scene in captions.values() for t in scene.values()).lower()
    assert re.search(r"\b(sofa|fridge|television|bookcase|desk chair|drape|cupboard)\b", all_text)
    assert re.search(r"\b(two|three|four|some|several) [a-z ]+s\b", all_text)
    scene_dir = synthetic_scannet / "scans" / SCENES[0]
    sens = read_sens(scene_dir / f"{SCENES[0]}.sens", decode={0, 20, 60, 80})
    ply = PlyData.read(str(scene_dir / f"{SCENES[0]}_vh_clean_2.ply"))
    xyz = np.stack([ply["vertex"][a] for a in "xyz"], 1).astype(np.float64)
    names = vertex_categories(scene_dir, len(xyz))
    scene_caps = captions[SCENES[0]]
    finite = {str(i) for i, f in enumerate(sens["frames"]) if np.all(np.isfinite(f["pose"]))}
    assert set(scene_caps) == finite
    assert len(set(scene_caps.values())) > 0.5 * len(scene_caps)
    for i in (0, 20, 60, 80):
        text = scene_caps[str(i)].lower()
        frame = sens["frames"][i]
        visible, _ = visible_vertices(xyz, frame["pose"], sens["intrinsic_depth"], frame["depth"])
        seen = set(names[visible]) - {""}
        named = []
        for phrase in ordered:
            pattern = rf"\b{re.escape(phrase)}\b"
            if re.search(pattern, text):
                named.append(phrases[phrase])
                text = re.sub(pattern, " ", text)
        assert named, scene_caps[str(i)]
        for options in named:
            assert options & seen, (scene_caps[str(i)], options, seen)


def test_geometry_rebuild_matches_written_depth(sens0: dict):
    from preprocessing.synthetic import scannet_scene

    scene = scannet_scene(0, 0, small=True)
    frame = sens0["frames"][20]
    np.testing.assert_allclose(scene.poses[20], frame["pose"], atol=1e-5)
    h, w = frame["depth"].shape
    k = sens0["intrinsic_depth"]
    # independent rays through every 7th pixel, cast with the general ray caster
    v, u = np.mgrid[0:h:7, 0:w:7]
    u, v = u.ravel(), v.ravel()
    dirs_cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones(u.size)], 1)
    hits = scene.geometry.raycast(frame["pose"][:3, 3], dirs_cam @ frame["pose"][:3, :3].T)
    written = frame["depth"][v, u] / 1000.0
    np.testing.assert_allclose(hits.t, written, rtol=0.006, atol=0.002)
    render = scene.geometry.render(frame["pose"], k, w, h, shading=False)
    np.testing.assert_array_equal(render.object_id[v, u], hits.object_id)


def test_raycaster_analytic():
    """One box in a 4 x 4 x 3 room: known distances, occlusion and normals."""
    from preprocessing.synthetic.geometry import SceneGeometry, SceneObject

    objects = [SceneObject(i, "wall", (200.0, 200.0, 200.0)) for i in range(6)] + [
        SceneObject(6, "box", (10.0, 20.0, 30.0))]
    geo = SceneGeometry(room_center=np.array([2.0, 2.0, 1.5]), room_half=np.array([2.0, 2.0, 1.5]),
                        room_yaw=0.0, room_faces=np.array([[3, 1], [0, 2], [4, 5]]),
                        centers=np.array([[3.0, 2.0, 0.5]]),
                        halves=np.array([[0.25, 0.5, 0.5]]), yaws=np.array([np.pi / 4]),
                        box_object=np.array([6]), objects=objects)
    origin = np.array([1.0, 2.0, 0.5])
    dirs = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 0, -1.0], [0, 0, 2.0], [0, 1.0, 0]])
    hits = geo.raycast(origin, dirs)
    # rotated by 45 degrees, the box's short half extent 0.25 is reached after 0.25 * sqrt(2) along x
    expected_box = 2.0 - 0.25 * np.sqrt(2)
    np.testing.assert_allclose(hits.t, [expected_box, 1.0, 0.5, 1.25, 2.0], atol=1e-9)
    np.testing.assert_array_equal(hits.object_id, [6, 3, 4, 5, 2])
    np.testing.assert_allclose(hits.normal[1], [1.0, 0, 0])  # wall x=0 faces into the room
    np.testing.assert_allclose(hits.normal[2], [0, 0, 1.0])  # floor faces up
    assert hits.normal[0] @ dirs[0] < 0  # the box face hit faces the ray
    # an origin outside the room hits nothing
    outside = geo.raycast(np.array([-1.0, 2.0, 1.0]), np.array([[1.0, 0.0, 0.0]]))
    assert outside.object_id[0] == -1 and np.isinf(outside.t[0])


def test_write_sens_streams_unknown_length(tmp_path: Path):
    from preprocessing.synthetic import SensFrameBytes, SensHeader, encode_color, encode_depth, write_sens

    k = np.diag([100.0, 100.0, 1.0, 1.0])
    header = SensHeader(intrinsic_color=k, intrinsic_depth=k, color_width=8, color_height=6, depth_width=4,
                        depth_height=3)
    depth = np.arange(12, dtype=np.uint16).reshape(3, 4)
    frames = (SensFrameBytes(np.eye(4), i, i + 1, encode_color(np.full((6, 8, 3), 50 * i, np.uint8)),
                             encode_depth(depth + i)) for i in range(3))
    assert write_sens(tmp_path / "x.sens", header, frames) == 3
    parsed = read_sens(tmp_path / "x.sens", decode={2})
    assert len(parsed["frames"]) == 3 and parsed["num_imu"] == 0 and parsed["trailing_bytes"] == 0
    np.testing.assert_array_equal(parsed["frames"][2]["depth"], depth + 2)
    assert abs(int(parsed["frames"][2]["color"].mean()) - 100) <= 2
    assert not list(tmp_path.glob("*.partial"))


def test_interrupted_write_leaves_no_complete_scene(tmp_path: Path, monkeypatch):
    from preprocessing.synthetic import scannet as synth_scannet

    real = synth_scannet.render_frame

    def failing(scene, index, rng):
        if index == 3:
            raise KeyboardInterrupt
        return real(scene, index, rng)

    monkeypatch.setattr(synth_scannet, "render_frame", failing)
    with pytest.raises(KeyboardInterrupt):
        synth_scannet.write_scannet(tmp_path / "out", scenes=1, small=True, progress=False)
    scans = tmp_path / "out" / "scans"
    assert not (scans / "scene0000_00").exists()
    assert not (tmp_path / "out" / "scannetv2_train.txt").exists()
    assert all(p.name.startswith(".tmp-") for p in scans.iterdir())


def test_cli_bad_input(tmp_path: Path):
    from xmask3d.cli import app

    runner = CliRunner()
    afile = tmp_path / "afile"
    afile.write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["synth", "scannet", str(afile), "--small"], ["synth", "s3dis", str(afile)],
                 ["synth", "scannet", str(tmp_path / "new"), "--scenes", "0"],
                 ["synth", "s3dis", str(tmp_path / "new2"), "--rooms", "0"],
                 ["synth", "scannet", str(tmp_path / "new3"), "--seed", "-1"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "error" in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert afile.read_text() == "x"
    # OUT exists but its scans/ is a file: refused before anything is written
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scans").write_text("not a directory")
    result = runner.invoke(app, ["synth", "scannet", str(tmp_path / "out"), "--small"])
    assert result.exit_code == 2 and "scans" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scans"]


S3DIS_LINE = re.compile(r"^-?\d+\.\d{6} -?\d+\.\d{6} -?\d+\.\d{6} \d{1,3} \d{1,3} \d{1,3}$")
S3DIS_CLASSES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa",
                 "bookcase", "board", "clutter")


def test_s3dis_layout(synthetic_s3dis: Path):
    root = synthetic_s3dis / "Stanford3dDataset_v1.2"
    rooms = sorted(p.relative_to(root).as_posix() for p in root.glob("Area_*/*") if p.is_dir())
    assert rooms == ["Area_1/hallway_1", "Area_1/office_1", "Area_5/conferenceRoom_1"]
    classes = set()
    for room in rooms:
        room_dir = root / room
        name = room_dir.name
        annotations = sorted((room_dir / "Annotations").iterdir())
        total = 0
        for path in annotations:
            cls, k = path.stem.rsplit("_", 1)
            assert cls in S3DIS_CLASSES and int(k) >= 1
            classes.add(cls)
            lines = path.read_text().splitlines()
            assert lines and all(S3DIS_LINE.match(line) for line in lines[:200])
            total += len(lines)
        room_lines = (room_dir / f"{name}.txt").read_text().splitlines()
        assert len(room_lines) == total  # the room file is the concatenation of its annotations
        values = np.array([line.split() for line in room_lines[::50]], dtype=np.float64)
        assert np.all((values[:, 3:] >= 0) & (values[:, 3:] <= 255))
        assert np.ptp(values[:, 2]) > 2.5  # floor to ceiling
    assert classes == set(S3DIS_CLASSES)
