"""The synthetic ScanNet val split holds novel classes of every ScanNet20 benchmark, so hIoU (the
primary metric the promotion rule compares) is defined on it."""

from __future__ import annotations

import pytest

from preprocessing.synthetic.categories import CATEGORIES
from preprocessing.synthetic.layout import ROOM_CYCLE, ROOM_TYPES
from preprocessing.synthetic.scannet import val_indices
from storage.benchmarks import get_benchmark

SCANNET20 = ("scannet20-b15n4", "scannet20-b12n7", "scannet20-b10n9")


def certain_nyu40(room: str) -> set[int]:
    """NYU40 ids of the objects a room of this type always holds (probability 1)."""
    _, _, recipe = ROOM_TYPES[room]
    return {CATEGORIES[name].nyu40 for name, low, _, p in recipe if low >= 1 and p == 1}


@pytest.mark.parametrize("scenes", range(2, 14))
def test_val_split_holds_novel_classes_of_every_scannet20_split(scenes):
    val = val_indices(scenes)
    assert len(val) == max(1, scenes // 4) and len(set(val)) == len(val)
    assert all(0 <= i < scenes for i in val)
    held = set().union(*(certain_nyu40(ROOM_CYCLE[i % len(ROOM_CYCLE)]) for i in val))
    for name in SCANNET20:
        bench = get_benchmark(name)
        novel = {bench.source_ids[i] for i in bench.novel_indices}
        rooms = [ROOM_CYCLE[i % len(ROOM_CYCLE)] for i in val]
        assert held & novel, f"{scenes} scenes: val rooms {rooms} hold no {name} novel class"


def test_val_split_is_the_last_scenes_when_they_hold_novel_classes():
    assert val_indices(3) == [2]  # the test fixture: office
    assert val_indices(8) == [6, 7]  # the demo: living room, bedroom + bathroom
    assert val_indices(16) == [12, 13, 14, 15]
    assert val_indices(4) == [2]  # the last scene is a kitchen: the office before it instead
