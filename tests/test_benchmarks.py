"""Benchmark definitions and label maps (storage/benchmarks.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from storage.benchmarks import BENCHMARK_NAMES, IGNORE, get_benchmark
from storage.errors import InputError

OFFICIAL_JSON = Path(__file__).resolve().parent / "data" / "benchmarks_official.json"  # tests/data/README.md


def test_packaged_definitions_match_the_official_ones():
    official = json.loads(OFFICIAL_JSON.read_text(encoding="utf-8"))
    assert set(official) == set(BENCHMARK_NAMES)
    for name, entry in official.items():
        b = get_benchmark(name)
        assert list(b.class_names) == entry["class_names"], name
        assert list(b.source_ids) == entry["source_ids"] and b.source_id_kind == entry["source_id_kind"], name
        assert b.dataset == entry["dataset"], name
        assert sorted(b.base) == sorted(entry["base"]) and sorted(b.novel) == sorted(entry["novel"]), name
        assert set(b.base) | set(b.novel) == set(entry["class_names"]), name


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_split_partitions_the_classes(name):
    b = get_benchmark(name)
    assert sorted(np.concatenate([b.base_indices, b.novel_indices]).tolist()) == list(range(b.num_classes))
    assert [b.class_names[i] for i in b.base_indices] == [c for c in b.class_names if c in b.base]
    assert b.base_indices.dtype == np.int64 and b.novel_indices.dtype == np.int64


def test_sizes_and_store_fields():
    expect = {"scannet20-b15n4": (19, 15, "points/nyu40"), "scannet20-b12n7": (19, 12, "points/nyu40"),
              "scannet20-b10n9": (19, 10, "points/nyu40"),
              "scannet200-b170n30": (200, 170, "points/category"),
              "scannet200-b150n50": (200, 150, "points/category"),
              "s3dis-b8n4": (12, 8, "points/label"), "s3dis-b6n6": (12, 6, "points/label")}
    for name, (t, c, fieldname) in expect.items():
        b = get_benchmark(name)
        assert (b.num_classes, len(b.base_indices), b.store_field) == (t, c, fieldname)


def test_recipes_follow_the_official_table():
    table = {"scannet20-b15n4": (16, 0.267, 0.5, 50, 0.35), "scannet20-b12n7": (12, 0.583, 0.5, 50, 0.35),
             "scannet20-b10n9": (8, 0.5, 1, 50, 0.2), "scannet200-b170n30": (48, 0.1, 2, 75, 0.25),
             "scannet200-b150n50": (32, 0.167, 2, 75, 0.35), "s3dis-b8n4": (16, 0.5, 0.5, 50, 0.35),
             "s3dis-b6n6": (16, 1.0, 0.5, 50, 0.35)}
    for name, (bw, pw, cw, ce, nr) in table.items():
        b = get_benchmark(name)
        assert (b.binary_weight, b.binary_pos_weight, b.contra_weight, b.contra_start_epoch, b.novel_ratio) \
            == pytest.approx((bw, pw, cw, ce, nr))
        assert b.base_ratio == 0.65


def test_scannet20_map_ignores_otherfurniture_and_unlisted_ids():
    b = get_benchmark("scannet20-b15n4")
    raw = np.array([0, 1, 2, 13, 14, 36, 39, 40, 41, 1000, -1])
    labels = b.map_raw(raw)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [IGNORE, 0, 1, IGNORE, b.class_names.index("desk"),
                               b.class_names.index("bathtub"), IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]


def test_scannet200_map_uses_raw_category_ids():
    b = get_benchmark("scannet200-b170n30")
    ids = np.array(b.source_ids)
    assert b.map_raw(ids).tolist() == list(range(200))
    assert b.map_raw(np.array([0, 12, 65535], dtype=np.uint16)).tolist()[0] == IGNORE
    assert b.map_raw(np.array([65535], dtype=np.uint16)).tolist() == [IGNORE]


def test_s3dis_ignores_clutter():
    b = get_benchmark("s3dis-b6n6")
    assert b.map_raw(np.arange(13, dtype=np.uint8)).tolist() == list(range(12)) + [IGNORE]


def test_to_base_and_to_binary():
    b = get_benchmark("scannet20-b15n4")
    labels = np.array([0, 5, 9, 12, 16, 18, IGNORE], dtype=np.uint8)  # wall sofa bookshelf desk toilet bath
    assert b.to_binary(labels).tolist() == [1, 0, 0, 0, 0, 1, IGNORE]
    assert b.to_base(labels).tolist() == [0, IGNORE, IGNORE, IGNORE, IGNORE, 14, IGNORE]
    everything = np.arange(b.num_classes, dtype=np.uint8)
    assert sorted(set(b.to_base(everything).tolist()) - {IGNORE}) == list(range(15))


def test_unknown_benchmark_and_bad_ids():
    with pytest.raises(InputError, match="scannet20-b99n1"):
        get_benchmark("scannet20-b99n1")
    with pytest.raises(InputError, match="integers"):
        get_benchmark("scannet20-b15n4").map_raw(np.array([1.5]))
