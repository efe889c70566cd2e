"""Torch dataset over a store: one sample = one view of a scene and the points visible in it.

As in the official implementation, a sample holds only the points the chosen view sees (3D
input, labels and point->pixel mapping alike). Labels are mapped through the chosen benchmark at
read time, so one store serves every benchmark of its dataset. Train mode draws a random valid
view per item (seeded by (seed, epoch, item), so runs are reproducible and DataLoader workers
agree); eval mode has one item per (scene, valid view).

A sample reads only what it needs: the view's slice of ``proj/*`` (65536-row chunks), the visible
points' rows of ``points/*`` (orthogonal selection), one colour frame and one label image. Each
process keeps every scene's lazy arrays and offsets open (metadata only), no scene data, so
random access over thousands of scenes costs the same as over a few.

Sample keys (numpy): ``scene_id, view_index, coord float32[N,3], color float32[N,3] in [-1,1],
point_index int64[N], voxel_coord int32[V,3], voxel_feat float32[V,3], inverse int64[N],
label int64[N] (0..T-1, 255), label_base int64[N] (0..C-1, 255), binary float32[N] (1/0/255),
uv int64[N,2] (column, row), image uint8[3,H,W], caption float32[D], has_caption bool``, and
``label_2d uint8[H,W]`` (the view's 2D label image as base labels 0..C-1, 255 = novel/ignored/
unannotated) when the scene has label images (``Scene.has_label_images``); with
``regions=True`` also the scene's region captions that survive in the view (storage.regions):
``region_clip float32[R,D]`` and ``region_point int64[M]`` / ``region_index int64[M]`` (a sample
point index and the region it belongs to; a point may be in several regions). A region survives
when at least ``min_region_points`` of its points are visible in the view (RegionPLC keeps the
part of a caption's point set that survives cropping); at most ``max_regions``, drawn at random.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from storage.benchmarks import Benchmark, get_benchmark
from storage.errors import InputError
from storage.objects import as_path
from storage.store import Scene, Store, open_store

log = logging.getLogger(__name__)

IGNORE = 255
OFFICIAL_MIN_POINTS = 400  # a view is valid with min_points < visible points < max_points
OFFICIAL_MAX_POINTS = 65000
MAX_DRAWS = 64
VOXEL_SHIFT = 100  # training augmentation: voxel coordinates += an integer in [0, 100) per axis


def scene_labels(scene: Scene, benchmark: Benchmark) -> np.ndarray:
    """uint8 [N] benchmark labels (0..T-1, 255 = ignore) of every point of a scene."""
    if benchmark.store_field not in scene:
        raise InputError(f"{scene.path}: has no {benchmark.store_field} (needed by {benchmark.name})")
    return benchmark.map_raw(scene[benchmark.store_field][:])


def voxelize(coord: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid coordinates of occupied voxels, the first point of each, and point -> voxel.

    Returns (voxel_coord int32[V,3] shifted to start at 0, first int64[V], inverse int64[N]).
    """
    grid = np.floor(coord / voxel_size).astype(np.int64)
    grid -= grid.min(axis=0) if len(grid) else 0
    dims = grid.max(axis=0) + 1 if len(grid) else np.ones(3, np.int64)
    key = (grid[:, 0] * dims[1] + grid[:, 1]) * dims[2] + grid[:, 2]
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return grid[first].astype(np.int32), first.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def random_rotate_scale(coord: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The official Voxelizer augmentation: rotations x,y ~ U(±pi/64), z ~ U(±pi) in random order,
    scale ~ U(0.9, 1.1)."""
    mats = []
    for axis, limit in ((0, np.pi / 64), (1, np.pi / 64), (2, np.pi)):
        a = rng.uniform(-limit, limit)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        mats.append(m)
    rot = np.eye(3)
    for k in rng.permutation(3):
        rot = rot @ mats[k]
    return (coord @ (rot * rng.uniform(0.9, 1.1)).T).astype(np.float32)


def random_voxel_shift(voxel_coord: np.ndarray, rng: np.random.Generator,
                       high: int = VOXEL_SHIFT) -> np.ndarray:
    """The official training shift (``coords[:, 1:4] += (torch.rand(3) * 100)``): one random
    integer offset in [0, high) per axis added to every voxel of the sample, so the grid's
    alignment with the UNet's stride-2 levels changes from sample to sample."""
    return (voxel_coord + rng.integers(0, high, size=3)).astype(np.int32)


@dataclass
class ViewRead:
    """What a sample reads of one view's correspondences: visible points, their pixels and labels."""

    point: np.ndarray  # int32 [M] point indices (ascending)
    uv: np.ndarray  # uint16 [M,2] (column, row)
    label: np.ndarray  # uint8 [M] benchmark labels 0..T-1, 255 = ignore


@dataclass
class SceneHandle:
    """One scene opened for sampling: lazy arrays (reads touch only the chunks a view needs), the
    CSR offsets of its correspondences, and the benchmark's raw-id field (points and label images)."""

    arrays: dict[str, Any]
    offsets: np.ndarray  # int64 [F+1]
    num_points: int
    benchmark: Benchmark
    label_field: str | None  # frames/nyu40 | frames/category, None = no label images (splatting)

    SAMPLE_ARRAYS = ("points/xyz", "points/rgb", "proj/point", "proj/uv", "frames/color", "captions/clip",
                     "captions/text")

    @classmethod
    def open(cls, scene: Scene, benchmark: Benchmark) -> SceneHandle:
        if benchmark.store_field not in scene:
            raise InputError(f"{scene.path}: has no {benchmark.store_field} (needed by {benchmark.name})")
        names = [*cls.SAMPLE_ARRAYS, benchmark.store_field]
        field = benchmark.store_field.replace("points/", "frames/", 1)
        label_field = field if scene.has_label_images and field in scene else None
        if label_field:
            names.append(label_field)
        return cls({n: scene[n] for n in names}, scene["proj/offsets"][:], scene.num_points, benchmark,
                   label_field)

    def view(self, view: int) -> ViewRead:
        """Frame ``view``'s visible points (one slice of proj/*) and their benchmark labels."""
        lo, hi = int(self.offsets[view]), int(self.offsets[view + 1])
        point = self.arrays["proj/point"][lo:hi]
        raw = self.arrays[self.benchmark.store_field].oindex[point]
        return ViewRead(point, self.arrays["proj/uv"][lo:hi], self.benchmark.map_raw(raw))

    def label_image(self, view: int) -> np.ndarray | None:
        """uint8 [H,W] benchmark labels of the view's 2D label image (255 = ignore), or None."""
        if self.label_field is None:
            return None
        return self.benchmark.map_raw(self.arrays[self.label_field][view])


class SceneViewDataset(Dataset):
    """Views of a store's scenes for one benchmark (see the module docstring for the sample)."""

    def __init__(self, store_path: str | Path, benchmark: str, split: str = "train", mode: str = "train",
                 voxel_size: float = 0.02, loop: int = 1, seed: int = 0,
                 image_size: tuple[int, int] = (320, 240), min_points: int = OFFICIAL_MIN_POINTS,
                 max_points: int = OFFICIAL_MAX_POINTS, min_labelled: int = 10,
                 augment: bool = False, scenes: list[str] | None = None, regions: bool = False,
                 max_regions: int = 32, min_region_points: int = 5) -> None:
        if mode not in ("train", "eval"):
            raise InputError(f"dataset mode must be 'train' or 'eval', got {mode!r}")
        self.store_path = as_path(store_path)  # a local path or a bucket URL (storage.objects)
        self.benchmark = get_benchmark(benchmark)
        self.split, self.mode = split, mode
        self.voxel_size, self.loop, self.seed = float(voxel_size), int(loop), int(seed)
        self.image_size = tuple(image_size)
        self.min_points, self.max_points, self.min_labelled = min_points, max_points, min_labelled
        self.augment = augment
        self.regions, self.max_regions, self.min_region_points = regions, max_regions, min_region_points
        self.epoch = 0
        store = self.store
        if store.attrs.get("dataset") != self.benchmark.dataset:
            raise InputError(f"{self.store_path}: a {store.attrs.get('dataset')} store cannot serve "
                             f"benchmark {benchmark}")
        ids = scenes if scenes is not None else store.scene_ids(split)
        self.valid_views: dict[str, np.ndarray] = {}
        for sid in ids:
            counts = np.diff(store.scene(sid)["proj/offsets"][:])
            valid = np.flatnonzero((counts > min_points) & (counts < max_points))
            if len(valid):
                self.valid_views[sid] = valid
            else:
                log.info("%s: no view with %d < visible points < %d; left out", sid, min_points, max_points)
        self.scene_ids = list(self.valid_views)
        if not self.scene_ids:
            raise InputError(f"{self.store_path}: no {split} scene has a view with {min_points} < visible "
                             f"points < {max_points}")
        self.items = [(s, int(v)) for s in self.scene_ids for v in self.valid_views[s]]
        if regions:
            without = [s for s in self.scene_ids if not store.scene(s).has_region_captions]
            if without:
                raise InputError(f"{self.store_path}: scene(s) {', '.join(without[:5])} have no region "
                                 "captions (preprocess with --region-captions, or xmask3d import-captions)")

    # the store handle is per process (DataLoader workers re-open it)
    @property
    def store(self) -> Store:
        if getattr(self, "_store", None) is None:
            self._store = open_store(self.store_path)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        state.pop("_handles", None)
        return state

    def set_epoch(self, epoch: int) -> None:
        """Train mode: a new epoch draws new views (deterministically)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.scene_ids) * self.loop if self.mode == "train" else len(self.items)

    def _handle(self, scene_id: str) -> SceneHandle:
        """The scene's lazy arrays and correspondence offsets, opened once per process (metadata
        only: a few kB per scene, so every scene of a 1500-scene store stays open)."""
        handles = self.__dict__.setdefault("_handles", {})
        if scene_id not in handles:
            handles[scene_id] = SceneHandle.open(self.store.scene(scene_id), self.benchmark)
        return handles[scene_id]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.mode == "eval":
            scene_id, view = self.items[i]
            return self._sample(scene_id, view, rng)
        scene_id = self.scene_ids[i % len(self.scene_ids)]
        valid = self.valid_views[scene_id]
        handle = self._handle(scene_id)
        for _ in range(MAX_DRAWS):
            view = int(rng.choice(valid))
            read = handle.view(view)
            if int((read.label != IGNORE).sum()) > self.min_labelled:
                break
        return self._sample(scene_id, view, rng, read)

    def _sample(self, scene_id: str, view: int, rng: np.random.Generator,
                read: ViewRead | None = None) -> dict[str, Any]:
        handle = self._handle(scene_id)
        read = read or handle.view(view)
        point, uv = read.point.astype(np.int64), read.uv
        coord = handle.arrays["points/xyz"].oindex[read.point]
        color = handle.arrays["points/rgb"].oindex[read.point].astype(np.float32) / 127.5 - 1.0
        vox_in = random_rotate_scale(coord, rng) if self.augment else coord
        voxel_coord, first, inverse = voxelize(vox_in, self.voxel_size)
        if self.augment and self.mode == "train":
            voxel_coord = random_voxel_shift(voxel_coord, rng)
        label = read.label
        image = handle.arrays["frames/color"][view]
        label_2d = handle.label_image(view)
        uv = uv.astype(np.int64)
        H, W = image.shape[:2]
        if (W, H) != self.image_size:

            image = np.asarray(Image.fromarray(image).resize(self.image_size, Image.BILINEAR))
            if label_2d is not None:
                label_2d = np.asarray(Image.fromarray(label_2d).resize(self.image_size, Image.NEAREST))
            sx, sy = self.image_size[0] / W, self.image_size[1] / H
            uv = np.stack([np.minimum(((uv[:, 0] + 0.5) * sx).astype(np.int64), self.image_size[0] - 1),
                           np.minimum(((uv[:, 1] + 0.5) * sy).astype(np.int64), self.image_size[1] - 1)], 1)
        caption = handle.arrays["captions/clip"][view].astype(np.float32)
        has_caption = bool(str(handle.arrays["captions/text"][view]).strip()) and caption.size > 0
        regions = {}
        if self.regions:
            regions = self._regions(self.store.scene(scene_id).region_captions(), read.point,
                                    handle.num_points, rng)
        base_2d = {} if label_2d is None else {"label_2d": self.benchmark.to_base(label_2d)}
        return {**regions, **base_2d,
            "scene_id": scene_id,
            "view_index": view,
            "coord": coord.astype(np.float32),
            "color": color,
            "point_index": point,
            "voxel_coord": voxel_coord,
            "voxel_feat": color[first],
            "inverse": inverse,
            "label": label.astype(np.int64),
            "label_base": self.benchmark.to_base(label).astype(np.int64),
            "binary": self.benchmark.to_binary(label).astype(np.float32),
            "uv": uv,
            "image": np.ascontiguousarray(image.transpose(2, 0, 1)),
            "caption": caption,
            "has_caption": has_caption,
        }

    def _regions(self, regions: Any, point: np.ndarray, num_points: int, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
        """The regions of the scene with >= min_region_points visible in the view (local indices)."""
        local = np.full(num_points, -1, np.int64)
        local[point] = np.arange(len(point))
        member = local[regions.point]
        region_of = np.repeat(np.arange(len(regions)), np.diff(regions.offsets))
        seen = member >= 0
        counts = np.bincount(region_of[seen], minlength=len(regions))
        keep = np.flatnonzero(counts >= self.min_region_points)
        if len(keep) > self.max_regions:
            keep = np.sort(rng.choice(keep, self.max_regions, replace=False))
        new_id = np.full(len(regions), -1, np.int64)
        new_id[keep] = np.arange(len(keep))
        chosen = seen & (new_id[region_of] >= 0)
        return {"region_clip": regions.clip[keep].astype(np.float32), "region_point": member[chosen],
                "region_index": new_id[region_of[chosen]]}


def collate_scenes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples for spconv: points concatenated with ``offset`` (cumulative counts),
    ``voxel_coord`` int32[ΣV,4] = (batch, x, y, z), ``inverse`` shifted into the concatenation;
    ``label_2d`` uint8[B,H,W] with ``has_label_2d`` bool[B] (255 everywhere for a view without)."""
    n_points = np.array([len(s["coord"]) for s in samples], np.int64)
    n_voxels = np.array([len(s["voxel_coord"]) for s in samples], np.int64)
    voxel_start = np.concatenate([[0], np.cumsum(n_voxels)[:-1]])

    def cat(key: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([s[key] for s in samples]))

    regions = {}
    if samples and "region_clip" in samples[0]:
        n_regions = np.array([len(s["region_clip"]) for s in samples], np.int64)
        region_start = np.concatenate([[0], np.cumsum(n_regions)[:-1]])
        point_start = np.concatenate([[0], np.cumsum(n_points)[:-1]])
        regions = {
            "region_clip": cat("region_clip"),
            "region_point": torch.from_numpy(np.concatenate(
                [s["region_point"] + o for s, o in zip(samples, point_start, strict=True)])),
            "region_index": torch.from_numpy(np.concatenate(
                [s["region_index"] + o for s, o in zip(samples, region_start, strict=True)])),
        }
    voxel_coord = np.concatenate([
        np.concatenate([np.full((len(s["voxel_coord"]), 1), b, np.int32), s["voxel_coord"]], axis=1)
        for b, s in enumerate(samples)])
    image_hw = samples[0]["image"].shape[1:]
    label_2d = np.stack([s.get("label_2d", np.full(image_hw, IGNORE, np.uint8)) for s in samples])
    return {
        "scene_id": [s["scene_id"] for s in samples],
        "view_index": torch.tensor([s["view_index"] for s in samples], dtype=torch.int64),
        "coord": cat("coord"),
        "color": cat("color"),
        "point_index": cat("point_index"),
        "voxel_coord": torch.from_numpy(voxel_coord),
        "voxel_feat": cat("voxel_feat"),
        "inverse": torch.from_numpy(np.concatenate([s["inverse"] + o for s, o in zip(samples, voxel_start,
                                                                                       strict=True)])),
        "label": cat("label"),
        "label_base": cat("label_base"),
        "binary": cat("binary"),
        "uv": cat("uv"),
        "offset": torch.from_numpy(np.cumsum(n_points)),
        "batch_index": torch.from_numpy(np.repeat(np.arange(len(samples)), n_points)),
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "caption": torch.from_numpy(np.stack([s["caption"] for s in samples])),
        "has_caption": torch.tensor([s["has_caption"] for s in samples]),
        "label_2d": torch.from_numpy(label_2d),
        "has_label_2d": torch.tensor(["label_2d" in s for s in samples]),
        **regions,
    }
