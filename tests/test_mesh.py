"""ScanNet mesh + annotation reader on small hand-written scenes (preprocessing/scannet/mesh.py)."""

import json

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from preprocessing.scannet.mesh import read_scannet_scene
from storage.errors import InputError

SCENE = "scene0007_00"
TSV = ("id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyu40class\n"
       "1\twall\twall\t8277\t1\t12\twall\n"
       "2\tchair\tchair\t4646\t5\t4\tchair\n"
       "40\tcouch\tcouch\t502\t6\t9\tsofa\n"
       "1191\toffice chair\tchair\t1\t5\t4\tchair\n")
ALIGN = np.arange(16, dtype=np.float64).reshape(4, 4) / 7


def write_ply(path, xyz, rgb, label=None, text=False):
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
              ("alpha", "u1")] + ([("label", "u2")] if label is not None else [])
    v = np.empty(len(xyz), dtype=fields)
    v["x"], v["y"], v["z"] = xyz.T
    v["red"], v["green"], v["blue"] = rgb.T
    v["alpha"] = 255
    if label is not None:
        v["label"] = label
    faces = np.empty(len(xyz) - 2, dtype=[("vertex_indices", "i4", (3,))])
    faces["vertex_indices"] = np.stack([np.arange(len(xyz) - 2), np.arange(1, len(xyz) - 1),
                                        np.arange(2, len(xyz))], axis=1)
    elements = [PlyElement.describe(v, "vertex"), PlyElement.describe(faces, "face")]
    PlyData(elements, text=text).write(str(path))


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(1)
    n = 12
    d = tmp_path / "scans" / SCENE
    d.mkdir(parents=True)
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(n, 3)).astype(np.uint8)
    nyu = np.array([1, 1, 1, 5, 5, 5, 6, 6, 0, 0, 5, 5], np.uint16)
    segs = [3, 3, 3, 7, 7, 7, 9, 9, 11, 11, 12, 12]
    write_ply(d / f"{SCENE}_vh_clean_2.ply", xyz, rgb)
    write_ply(d / f"{SCENE}_vh_clean_2.labels.ply", xyz, rgb, nyu)
    (d / f"{SCENE}_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"segIndices": segs}))
    groups = [{"id": 0, "objectId": 0, "segments": [3], "label": "wall"},
              {"id": 1, "objectId": 1, "segments": [7], "label": "chair"},
              {"id": 2, "objectId": 2, "segments": [9], "label": "couch"},
              {"id": 3, "objectId": 3, "segments": [12], "label": "office chair"}]
    (d / f"{SCENE}.aggregation.json").write_text(json.dumps({"sceneId": SCENE, "segGroups": groups}))
    (d / f"{SCENE}.txt").write_text("colorHeight = 968\naxisAlignment = "
                                    + " ".join(f"{v:.17g}" for v in ALIGN.ravel()) + "\nnumDepthFrames = 5\n")
    (tmp_path / "labels.tsv").write_text(TSV)
    return d, tmp_path / "labels.tsv", xyz, rgb


def test_reads_vertices_labels_and_categories(scene):
    d, tsv, xyz, rgb = scene
    m = read_scannet_scene(d, tsv)
    np.testing.assert_array_equal(m.xyz, xyz)
    np.testing.assert_array_equal(m.rgb, rgb)
    assert m.xyz.dtype == np.float32 and m.rgb.dtype == np.uint8
    assert m.nyu40.dtype == np.uint8 and m.nyu40.tolist() == [1, 1, 1, 5, 5, 5, 6, 6, 0, 0, 5, 5]
    assert m.category.dtype == np.uint16
    assert m.category.tolist() == [1, 1, 1, 2, 2, 2, 40, 40, 0, 0, 1191, 1191]
    np.testing.assert_array_equal(m.axis_alignment, ALIGN)
    assert set(m.source_files) == {f"{SCENE}_vh_clean_2.ply", f"{SCENE}_vh_clean_2.labels.ply",
                                   f"{SCENE}_vh_clean_2.0.010000.segs.json", f"{SCENE}.aggregation.json",
                                   f"{SCENE}.txt"}
    assert m.source_files[f"{SCENE}.txt"] == (d / f"{SCENE}.txt").stat().st_size


def test_ascii_ply_and_missing_alignment(scene):
    d, tsv, xyz, rgb = scene
    write_ply(d / f"{SCENE}_vh_clean_2.ply", xyz, rgb, text=True)
    (d / f"{SCENE}.txt").write_text("colorHeight = 968\n")
    m = read_scannet_scene(d, tsv)
    np.testing.assert_allclose(m.xyz, xyz, rtol=1e-6)
    np.testing.assert_array_equal(m.axis_alignment, np.eye(4))


def test_labels_ply_without_label(scene):
    d, tsv, xyz, rgb = scene
    write_ply(d / f"{SCENE}_vh_clean_2.labels.ply", xyz, rgb)
    with pytest.raises(InputError, match=r"labels\.ply: PLY vertex element has no 'label' property"):
        read_scannet_scene(d, tsv)


def test_label_vertex_count_mismatch(scene):
    d, tsv, xyz, rgb = scene
    write_ply(d / f"{SCENE}_vh_clean_2.labels.ply", xyz[:10], rgb[:10], np.ones(10, np.uint16))
    with pytest.raises(InputError, match=r"labels\.ply: 10 vertices, but \S+_vh_clean_2\.ply has 12"):
        read_scannet_scene(d, tsv)


def test_aggregation_with_unknown_segments(scene):
    d, tsv, _, _ = scene
    path = d / f"{SCENE}.aggregation.json"
    agg = json.loads(path.read_text())
    agg["segGroups"][1]["segments"] = [7, 8, 99]
    path.write_text(json.dumps(agg))
    with pytest.raises(InputError, match=r"aggregation\.json: object 1 refers to segments \[8, 99\]"):
        read_scannet_scene(d, tsv)


def test_unknown_raw_category(scene):
    d, tsv, _, _ = scene
    path = d / f"{SCENE}.aggregation.json"
    agg = json.loads(path.read_text())
    agg["segGroups"][2]["label"] = "hoverboard"
    path.write_text(json.dumps(agg))
    with pytest.raises(InputError, match=r"object 2 has raw category 'hoverboard', not in .*labels\.tsv"):
        read_scannet_scene(d, tsv)


def test_segs_count_mismatch(scene):
    d, tsv, _, _ = scene
    (d / f"{SCENE}_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"segIndices": [1, 2]}))
    with pytest.raises(InputError, match="segIndices has 2 entries for 12 vertices"):
        read_scannet_scene(d, tsv)


def test_corrupt_and_missing_files(scene):
    d, tsv, _, _ = scene
    ply = d / f"{SCENE}_vh_clean_2.ply"
    data = ply.read_bytes()
    ply.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"_vh_clean_2\.ply: corrupt PLY"):
        read_scannet_scene(d, tsv)
    ply.write_bytes(b"this is not a ply file\n")
    with pytest.raises(InputError, match=r"_vh_clean_2\.ply: corrupt PLY"):
        read_scannet_scene(d, tsv)
    ply.unlink()
    with pytest.raises(InputError, match=r"_vh_clean_2\.ply: file not found"):
        read_scannet_scene(d, tsv)
    ply.write_bytes(data)
    (d / f"{SCENE}.aggregation.json").write_text("{not json")
    with pytest.raises(InputError, match=r"aggregation\.json: invalid JSON"):
        read_scannet_scene(d, tsv)


def test_synthetic_scenes_read_back_as_generated(synthetic_scannet):
    from preprocessing.synthetic import scannet_scene
    from preprocessing.synthetic.categories import CATEGORIES

    tsv = synthetic_scannet / "scannetv2-labels.combined.tsv"
    for index in range(3):
        scene = scannet_scene(0, index, small=True)
        m = read_scannet_scene(synthetic_scannet / "scans" / scene.scene_id, tsv)
        surf = scene.geometry.surface_grid(scene.size.mesh_spacing)
        objects = scene.geometry.objects
        annotated = np.array([o.annotated for o in objects])
        nyu = np.array([CATEGORIES[o.category].nyu40 for o in objects])
        raw = np.array([CATEGORIES[o.category].raw_id for o in objects])
        np.testing.assert_array_equal(m.xyz, surf.xyz.astype(np.float32))
        noise = np.random.default_rng([0, index, 2]).normal(0, 4.0, surf.xyz.shape)
        rgb = scene.geometry.colors(surf.xyz, surf.normal, surf.object_id) + noise
        np.testing.assert_array_equal(m.rgb, np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
        np.testing.assert_array_equal(m.nyu40, np.where(annotated[surf.object_id], nyu[surf.object_id], 0))
        np.testing.assert_array_equal(m.category, np.where(annotated[surf.object_id], raw[surf.object_id], 0))
        np.testing.assert_allclose(m.axis_alignment, scene.axis_alignment, atol=1e-6)
        assert m.category.max() > 40  # ScanNet200 raw ids, not NYU40
