"""Region captions as data: the synthetic detector-captioner, box -> point sets, the store, the dataset."""

import json

import numpy as np
import pytest

from preprocessing.region_captions import (
    REGION_FORMAT,
    box_point_sets,
    load_region_captions,
    scene_region_sets,
)
from preprocessing.synthetic.captions import region_captions
from storage.benchmarks import get_benchmark
from storage.dataset import SceneViewDataset, collate_scenes
from storage.errors import InputError
from storage.store import open_store


def test_detector_boxes_name_visible_objects_with_noise():
    """One phrase per visible object, loose boxes around it, structure never named; misses happen."""
    rng = np.random.default_rng(0)
    image = np.full((60, 80), -1)
    image[:, :] = 0  # wall everywhere
    image[10:30, 10:30] = 1  # a chair, 400 px
    image[35:55, 40:75] = 2  # a sink, 700 px
    categories, annotated = ["wall", "chair", "sink"], [True, True, True]
    seen, boxes = {}, []
    for _ in range(300):
        for region in region_captions(image, categories, annotated, rng):
            seen[region["text"]] = seen.get(region["text"], 0) + 1
            boxes.append(region["box"])
    assert not any("wall" in t for t in seen)
    chair_boxes = [b for b in boxes if b[0] < 20]
    assert all(b[0] <= 10 and b[1] <= 10 and b[2] >= 30 and b[3] >= 30 for b in chair_boxes)  # loose
    assert all(b[2] - b[0] <= 20 * 1.3 + 1 for b in chair_boxes)  # but not arbitrarily
    total = len(boxes)
    assert 0.8 * 600 < total < 0.97 * 600  # ~10 % of the 600 object sightings missed
    synonyms = {"a washbasin", "the washbasin", "a sink", "the sink"}
    assert len(synonyms & set(seen)) >= 3  # synonyms and articles vary
    named_right = sum(v for t, v in seen.items() if t.split()[-1] in {"chair", "sink", "washbasin"})
    assert named_right / total > 0.9  # a few wrong names, not many


def test_box_point_sets_use_pixel_centres_strictly_inside():
    offsets = np.array([0, 4, 6])
    point = np.array([10, 11, 12, 13, 20, 21], np.int32)
    uv = np.array([[0, 0], [4, 4], [5, 5], [9, 2], [1, 1], [3, 3]], np.uint16)
    boxes = np.array([[0, 0, 5, 5], [0, 0, 10, 10], [5.5, 0, 10, 3]])
    sets = box_point_sets(offsets, point, uv, [0, 1, 0], boxes)
    assert sets[0].tolist() == [10, 11]  # centres (0.5,0.5), (4.5,4.5) inside; (5.5,5.5) not
    assert sets[1].tolist() == [20, 21]  # frame 1's points only
    assert sets[2].tolist() == [13]


def test_boxes_rescale_each_axis_from_colour_to_stored_size():
    """Colour 400x100 -> stored 40x20: x by 1/10, y by 1/5 (no axis swap)."""
    regions = {7: [("a lamp", (100.0, 50.0, 200.0, 100.0))]}
    offsets = np.array([0, 3])
    point = np.array([0, 1, 2], np.int32)
    uv = np.array([[12, 12], [12, 5], [25, 15]], np.uint16)
    texts, sets, rows, boxes = scene_region_sets(regions, [7], (400, 100), (40, 20), offsets, point, uv)
    assert texts == ["a lamp"] and rows.tolist() == [0]
    assert boxes[0].tolist() == pytest.approx([10, 10, 20, 20])
    assert sets[0].tolist() == [0]


def test_empty_regions_are_dropped_and_frames_without_regions_are_fine():
    regions = {0: [("a lamp", (0.0, 0.0, 1.0, 1.0))]}
    texts, sets, rows, boxes = scene_region_sets(regions, [0, 20], (10, 10), (10, 10), np.array([0, 1, 1]),
                                                 np.array([5], np.int32), np.array([[8, 8]], np.uint16))
    assert texts == [] and sets == [] and rows.shape == (0,) and boxes.shape == (0, 4)


@pytest.mark.parametrize("content, message", [
    ("{", "not a valid region caption JSON"),
    (json.dumps({"scenes": {}}), "expected"),
    (json.dumps({"format": REGION_FORMAT, "scenes": {"s": {"x": []}}}), "not an integer"),
    (json.dumps({"format": REGION_FORMAT, "scenes": {"s": {"0": [{"text": "a"}]}}}), "region 0"),
    (json.dumps({"format": REGION_FORMAT, "scenes": {"s": {"0": [{"text": "a", "box": [5, 5, 1, 9]}]}}}),
     "empty or non-finite box"),
])
def test_bad_region_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "regions.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        load_region_captions(path)
    assert str(path) in str(error.value)


def test_preprocessed_regions_hold_the_named_objects(synthetic_store):
    """Most of a region's labelled points are a class its phrase could name (boxes are loose)."""
    store = open_store(synthetic_store)
    bench = get_benchmark("scannet20-b15n4")
    fractions = []
    for scene_id in store.scene_ids():
        scene = store.scene(scene_id)
        assert scene.has_region_captions
        regions = scene.region_captions()
        assert len(regions) >= 3 * scene.num_frames  # several objects per view
        assert regions.frame.min() >= 0 and regions.frame.max() < scene.num_frames
        label = bench.map_raw(scene["points/nyu40"][:])
        visible = set()
        for i in range(len(regions)):
            pts = regions.points_of(i)
            point, _ = scene.view(int(regions.frame[i]))
            visible = set(point.tolist())
            assert set(pts.tolist()) <= visible  # a region is part of its own frame's visible points
            if "chair" in regions.text[i]:
                labelled = label[pts][label[pts] != 255]
                fractions.append(np.mean(labelled == bench.class_names.index("chair")))
    assert fractions and np.median(fractions) > 0.4


def test_dataset_carries_the_regions_seen_in_the_view(synthetic_store):
    ds = SceneViewDataset(synthetic_store, "scannet20-b15n4", regions=True, loop=2, min_region_points=5)
    samples = [ds[0], ds[1]]
    for s in samples:
        assert s["region_clip"].shape[1] == 384 and len(s["region_clip"]) > 0
        assert s["region_point"].max() < len(s["coord"])
        counts = np.bincount(s["region_index"], minlength=len(s["region_clip"]))
        assert counts.min() >= 5
    batch = collate_scenes(samples)
    n0, r0 = len(samples[0]["coord"]), len(samples[0]["region_clip"])
    second = batch["region_index"] >= r0
    assert (batch["region_point"][second] >= n0).all() and (batch["region_point"][~second] < n0).all()
    assert len(batch["region_clip"]) == r0 + len(samples[1]["region_clip"])
    capped = SceneViewDataset(synthetic_store, "scannet20-b15n4", regions=True, loop=2, max_regions=3)
    assert len(capped[0]["region_clip"]) <= 3


def test_training_with_regions_refuses_a_store_without_them(tmp_path, synthetic_scannet):
    from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_scannet_scene

    store = tmp_path / "plain.zarr"
    cfg = PreprocessConfig(captions=synthetic_scannet / "captions.json", show_progress=False)
    listing, cfg = prepare_store("scannet", synthetic_scannet, store, cfg)
    scene_id = next(iter(listing))
    preprocess_scannet_scene(synthetic_scannet, scene_id, store, cfg, "train")
    assert not open_store(store).scene(scene_id).has_region_captions
    with pytest.raises(InputError, match="no region captions"):
        SceneViewDataset(store, "scannet20-b15n4", regions=True)
