"""SceneViewDataset / collate_scenes: visible points only, benchmark labels at read time, seeding."""

import numpy as np
import pytest
import torch

from storage.benchmarks import get_benchmark
from storage.dataset import SceneViewDataset, collate_scenes, voxelize
from storage.errors import InputError
from storage.store import open_store


def test_train_sample_holds_only_the_views_visible_points(synthetic_store):
    ds = SceneViewDataset(synthetic_store, "scannet20-b15n4", split="train", mode="train", seed=3)
    assert len(ds) == 2
    bench = get_benchmark("scannet20-b15n4")
    sample = ds[1]
    scene = open_store(synthetic_store).scene(sample["scene_id"])
    point, uv = scene.view(sample["view_index"])
    np.testing.assert_array_equal(sample["point_index"], point)
    np.testing.assert_array_equal(sample["uv"], uv)
    xyz, rgb, nyu40 = scene["points/xyz"][:], scene["points/rgb"][:], scene["points/nyu40"][:]
    np.testing.assert_array_equal(sample["coord"], xyz[point])
    np.testing.assert_allclose(sample["color"], rgb[point] / 127.5 - 1, atol=1e-6)
    label = bench.map_raw(nyu40[point])
    np.testing.assert_array_equal(sample["label"], label)
    np.testing.assert_array_equal(sample["label_base"], bench.to_base(label))
    np.testing.assert_array_equal(sample["binary"], bench.to_binary(label).astype(np.float32))
    assert set(np.unique(sample["label_base"])) <= set(range(15)) | {255}
    image = scene["frames/color"][sample["view_index"]]
    np.testing.assert_array_equal(sample["image"], image.transpose(2, 0, 1))
    assert sample["image"].shape == (3, 240, 320) and sample["image"].dtype == np.uint8
    assert sample["caption"].shape == (384,) and sample["has_caption"]
    np.testing.assert_array_equal(sample["caption"], scene["captions/clip"][sample["view_index"]])
    # voxels: 2 cm grid, every point maps to the voxel that contains it
    grid = np.floor(sample["coord"] / 0.02).astype(np.int64)
    grid -= grid.min(0)
    np.testing.assert_array_equal(sample["voxel_coord"][sample["inverse"]], grid)
    assert len(sample["voxel_coord"]) == len(np.unique(grid, axis=0))


def test_same_store_serves_scannet200_in_eval_mode(synthetic_store):
    ds = SceneViewDataset(synthetic_store, "scannet200-b170n30", split="val", mode="eval")
    scene = open_store(synthetic_store).scene("scene0002_00")
    assert [item[1] for item in ds.items] == list(range(scene.num_frames))  # every view is valid here
    bench = get_benchmark("scannet200-b170n30")
    sample = ds[2]
    assert sample["view_index"] == 2
    category = scene["points/category"][:]
    np.testing.assert_array_equal(sample["label"], bench.map_raw(category[sample["point_index"]]))
    assert sample["label"].max() < 200 or (sample["label"] == 255).any()


def test_view_validity_bounds_and_dataset_mismatch(synthetic_store):
    store = open_store(synthetic_store)
    counts = np.diff(store.scene("scene0000_00")["proj/offsets"][:])
    lo = int(np.sort(counts)[1])  # leaves out the smallest view (and any equal to lo)
    ds = SceneViewDataset(synthetic_store, "scannet20-b15n4", split="train", mode="eval", min_points=lo,
                          scenes=["scene0000_00"])
    assert [v for _, v in ds.items] == np.flatnonzero(counts > lo).tolist()
    with pytest.raises(InputError, match="no train scene has a view"):
        SceneViewDataset(synthetic_store, "scannet20-b15n4", split="train", min_points=10**6,
                         max_points=10**7)
    with pytest.raises(InputError, match="cannot serve benchmark s3dis-b8n4"):
        SceneViewDataset(synthetic_store, "s3dis-b8n4")
    with pytest.raises(InputError, match="unknown benchmark"):
        SceneViewDataset(synthetic_store, "scannet30")


def test_seeded_views_are_deterministic_and_change_with_epoch(synthetic_store):
    a = SceneViewDataset(synthetic_store, "scannet20-b15n4", loop=8, seed=7)
    b = SceneViewDataset(synthetic_store, "scannet20-b15n4", loop=8, seed=7)
    views_a = [a[i]["view_index"] for i in range(len(a))]
    assert views_a == [b[i]["view_index"] for i in range(len(b))]
    a.set_epoch(1)
    assert views_a != [a[i]["view_index"] for i in range(len(a))]
    aug = SceneViewDataset(synthetic_store, "scannet20-b15n4", seed=7, augment=True)
    s1, s2 = aug[0], aug[0]
    np.testing.assert_array_equal(s1["voxel_coord"], s2["voxel_coord"])
    plain = SceneViewDataset(synthetic_store, "scannet20-b15n4", seed=7)[0]
    assert plain["view_index"] == s1["view_index"]
    np.testing.assert_array_equal(s1["coord"], plain["coord"])  # augmentation only moves the voxel grid
    assert not np.array_equal(s1["voxel_coord"][s1["inverse"]], plain["voxel_coord"][plain["inverse"]])


def test_collate_batches_for_spconv(synthetic_store):
    ds = SceneViewDataset(synthetic_store, "scannet20-b15n4", split="train", mode="eval")
    samples = [ds[0], ds[3], ds[5]]
    batch = collate_scenes(samples)
    n = [len(s["coord"]) for s in samples]
    v = [len(s["voxel_coord"]) for s in samples]
    assert batch["offset"].tolist() == np.cumsum(n).tolist()
    assert batch["coord"].shape == (sum(n), 3) and batch["voxel_coord"].shape == (sum(v), 4)
    assert batch["voxel_coord"].dtype == torch.int32 and batch["inverse"].dtype == torch.int64
    # each point's voxel belongs to its own sample, at the same grid position as before batching
    assert torch.equal(batch["voxel_coord"][batch["inverse"], 0].long(), batch["batch_index"])
    for b, s in enumerate(samples):
        lo = sum(n[:b])
        got = batch["voxel_coord"][batch["inverse"][lo:lo + n[b]], 1:].numpy()
        np.testing.assert_array_equal(got, s["voxel_coord"][s["inverse"]])
    assert batch["image"].shape == (3, 3, 240, 320) and batch["caption"].shape == (3, 384)
    assert batch["has_caption"].tolist() == [True, True, True]
    assert batch["scene_id"] == [s["scene_id"] for s in samples]


def test_dataloader_workers_give_the_same_batches(synthetic_store):
    ds = SceneViewDataset(synthetic_store, "scannet20-b15n4", loop=2, seed=1)
    serial = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_scenes))
    parallel = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_scenes, num_workers=2))
    assert len(serial) == len(parallel) == 2
    for x, y in zip(serial, parallel, strict=True):
        assert torch.equal(x["point_index"], y["point_index"])
        assert torch.equal(x["voxel_coord"], y["voxel_coord"])


def test_voxelize_small_cases():
    coord = np.array([[0.001, 0, 0], [0.019, 0.005, 0], [0.021, 0, 0], [-0.03, 0.05, 0.0]], np.float32)
    vox, first, inverse = voxelize(coord, 0.02)
    assert len(vox) == 3 and inverse[0] == inverse[1] != inverse[2]
    grid = np.floor(coord / 0.02).astype(int)
    np.testing.assert_array_equal(vox[inverse], grid - grid.min(0))
    assert (first < len(coord)).all() and vox.min() == 0
