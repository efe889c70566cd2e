"""S3DIS room reader on small hand-written Annotations files (preprocessing/s3dis/reader.py)."""

import logging

import numpy as np
import pytest

from preprocessing.s3dis.reader import S3DIS_CLASSES, read_s3dis_room
from storage.errors import InputError


def write_room(root, files):
    room = root / "Area_5" / "hallway_6"
    (room / "Annotations").mkdir(parents=True)
    for name, text in files.items():
        (room / "Annotations" / name).write_text(text)
    # The room-level concatenation is not read: the annotations are the source of truth.
    (room / "hallway_6.txt").write_text("0 0 0 0 0 0\n")
    return room


def test_reads_and_concatenates_annotations(tmp_path):
    chair = "1.000 2.000 3.000 10 20 30\n1.5 2.5 3.5 40 50 60\n"
    room = write_room(tmp_path, {
        "chair_1.txt": chair,
        "ceiling_1.txt": "0.1 0.2 2.9 255 255 255\n",
        "stairs_1.txt": "4 4 4 1 2 3\n",
    })
    r = read_s3dis_room(room)
    # files in sorted order: ceiling_1, chair_1, stairs_1
    assert r.label.tolist() == [0, 8, 8, S3DIS_CLASSES.index("clutter")]
    np.testing.assert_allclose(r.xyz[1:3], [[1, 2, 3], [1.5, 2.5, 3.5]])
    assert r.xyz.dtype == np.float32 and r.rgb.dtype == np.uint8 and r.label.dtype == np.uint8
    assert r.rgb.tolist() == [[255, 255, 255], [10, 20, 30], [40, 50, 60], [1, 2, 3]]
    assert r.skipped_lines == 0
    assert r.source_files["Annotations/chair_1.txt"] == len(chair)
    assert len(S3DIS_CLASSES) == 13 and S3DIS_CLASSES[0] == "ceiling" and S3DIS_CLASSES[-1] == "clutter"


def test_malformed_line_is_skipped_and_named(tmp_path, caplog):
    room = write_room(tmp_path, {
        "ceiling_1.txt": "1 1 1 9 9 9\n2 2 2 9 9\x10 9\n3 3 3 9 9 9\n4 4 4 9 9\n",
        "wall_2.txt": "5 5 5 1 1 1\n",
    })
    with caplog.at_level(logging.WARNING):
        r = read_s3dis_room(room)
    assert r.skipped_lines == 2
    assert r.xyz[:, 0].tolist() == [1, 3, 5]
    assert r.label.tolist() == [0, 0, 2]
    assert "ceiling_1.txt: malformed line 2" in caplog.text and "line 4" in caplog.text
    with pytest.raises(InputError, match=r"ceiling_1\.txt: malformed line 2"):
        read_s3dis_room(room, strict=True)


def test_not_a_room(tmp_path):
    with pytest.raises(InputError, match="no Annotations"):
        read_s3dis_room(tmp_path)
    room = write_room(tmp_path, {"wall_1.txt": "\n"})
    with pytest.raises(InputError, match="no points"):
        read_s3dis_room(room)


def test_synthetic_rooms_read_back_as_generated(synthetic_s3dis):
    from preprocessing.synthetic import s3dis_room

    for index in range(3):
        spec = s3dis_room(0, index)
        room_dir = synthetic_s3dis / "Stanford3dDataset_v1.2" / spec.area / spec.name
        room = read_s3dis_room(room_dir, strict=True)
        rng = np.random.default_rng([0, index, 11])
        surf = spec.geometry.surface_grid(0.06, jitter=rng)
        label = np.array([S3DIS_CLASSES.index(o.category) for o in spec.geometry.objects])[surf.object_id]
        assert room.skipped_lines == 0 and len(room.xyz) == len(surf.xyz)
        assert np.bincount(room.label, minlength=13).tolist() == np.bincount(label, minlength=13).tolist()
        # files are concatenated in name order, the generator writes object by object: compare sorted
        truth = np.round(surf.xyz, 6).astype(np.float32)  # the files hold 6 decimals
        got = np.lexsort((room.label, *room.xyz.T))  # label breaks ties between coincident points
        want = np.lexsort((label, *truth.T))
        np.testing.assert_allclose(room.xyz[got], truth[want], atol=1e-5)
        np.testing.assert_array_equal(room.label[got], label[want])
