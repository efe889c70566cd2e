"""Defects of the real S3DIS release: a NUL byte for a space (Area_5/hallway_6 ceiling) is repaired,
a byte-identical copy of an annotation file (``wall_3 (1).txt``) is counted once."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from preprocessing.s3dis.reader import S3DIS_CLASSES, read_s3dis_room
from storage.errors import InputError


def write_room(root, files: dict[str, bytes]):
    room = root / "Area_5" / "hallway_6"
    (room / "Annotations").mkdir(parents=True)
    for name, data in files.items():
        (room / "Annotations" / name).write_bytes(data)
    return room


def test_nul_for_a_space_is_repaired_not_dropped(tmp_path, caplog):
    ceiling = b"1 1 2.9 10 20 30\n-19.678 -2.385 2.601\x00106 103 98\n3 3 2.9 9 9 9\n"
    room = write_room(tmp_path, {"ceiling_1.txt": ceiling, "wall_1.txt": b"5 5 5 1 1 1\n"})
    with caplog.at_level(logging.WARNING):
        r = read_s3dis_room(room, strict=True)  # repaired lines are not errors, even in strict mode
    assert r.repaired_lines == 1 and r.skipped_lines == 0
    np.testing.assert_allclose(r.xyz[1], [-19.678, -2.385, 2.601], rtol=1e-6)
    assert r.rgb[1].tolist() == [106, 103, 98]
    assert r.label.tolist() == [0, 0, 0, S3DIS_CLASSES.index("wall")]
    assert "ceiling_1.txt: line 2 has a NUL byte for a space" in caplog.text


def test_nul_that_does_not_give_six_numbers_is_still_malformed(tmp_path):
    room = write_room(tmp_path, {"ceiling_1.txt": b"1 1 1 9 9 9\n2 2\x002 9 9\n"})
    r = read_s3dis_room(room)
    assert r.skipped_lines == 1 and r.repaired_lines == 0 and len(r.xyz) == 1
    with pytest.raises(InputError, match=r"ceiling_1\.txt: malformed line 2"):
        read_s3dis_room(room, strict=True)


def test_byte_identical_copy_is_counted_once(tmp_path, caplog):
    wall = b"0 0 0 1 2 3\n0 1 0 4 5 6\n"
    other_wall = b"0 0 1 1 2 3\n"  # a different file with a copy-like name is a file of its own
    room = write_room(tmp_path, {"wall_3.txt": wall, "wall_3 (1).txt": wall, "wall_4 (1).txt": other_wall,
                                 "chair_1.txt": b"1 1 1 7 7 7\n"})
    with caplog.at_level(logging.WARNING):
        r = read_s3dis_room(room)
    assert len(r.xyz) == 4  # chair 1 + wall_3 2 + wall_4 (1) 1, not 6
    assert r.label.tolist().count(S3DIS_CLASSES.index("wall")) == 3
    assert r.duplicate_files == ("Annotations/wall_3 (1).txt",)
    assert "wall_3 (1).txt: byte-identical to" in caplog.text and caplog.text.count("byte-identical") == 1
    assert set(r.source_files) == {"Annotations/wall_3.txt", "Annotations/wall_3 (1).txt",
                                   "Annotations/wall_4 (1).txt", "Annotations/chair_1.txt"}


def test_same_points_different_bytes_are_not_duplicates(tmp_path):
    room = write_room(tmp_path, {"wall_3.txt": b"0 0 0 1 2 3\n", "wall_3 (1).txt": b"0.0 0.0 0.0 1 2 3\n"})
    r = read_s3dis_room(room)
    assert len(r.xyz) == 2 and r.duplicate_files == ()
