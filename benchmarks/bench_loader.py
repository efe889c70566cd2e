"""Training loader throughput: samples/s of ``SceneViewDataset`` + ``collate_scenes`` in a DataLoader.

Baseline in the same run: the same samples assembled the way the official loader does it: per
sample a ``torch.load`` of the scene's points and labels, the view's colour JPEG, depth PNG and
pose text read from disk, and OpenScene's mapper run over all points of the scene to find the
visible ones (the store has them precomputed). Both produce the same sample keys.

    .venv/bin/python benchmarks/bench_loader.py --store STORE.zarr            # an existing store
    .venv/bin/python benchmarks/bench_loader.py                               # builds a small one
    .venv/bin/python benchmarks/bench_loader.py --store S --workers 4 --batches 200
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def build_store(work: Path) -> Path:
    """3 small synthetic scenes preprocessed (once) into a store under ``work``."""
    from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_scannet_scene
    from preprocessing.synthetic import write_scannet

    store = work / "store.zarr"
    if store.is_dir():
        return store
    raw = work / "raw"
    if not (raw / "captions.json").is_file():
        write_scannet(raw, scenes=3, small=True, seed=0)
    tmp = work / "tmp-store.zarr"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = PreprocessConfig(captions=raw / "captions.json", show_progress=False)
    listing, cfg = prepare_store("scannet", raw, tmp, cfg)
    for sid, split in listing.items():
        preprocess_scannet_scene(raw, sid, tmp, cfg, split)
    tmp.rename(store)
    return store


def export_reference(store_path: Path, out: Path) -> None:
    """The official data layout: one .pth per scene (points, labels) and, per view, a colour
    JPEG, a 16-bit depth PNG and a pose text file (as OpenScene's ScanNet 2D export writes)."""
    from storage.store import open_store

    store = open_store(store_path)
    out.mkdir(parents=True, exist_ok=True)
    for sid in store.scene_ids():
        scene = store.scene(sid)
        data = {"xyz": scene["points/xyz"][:], "rgb": scene["points/rgb"][:],
                "label": scene["points/nyu40"][:].astype(np.int64), "clip": scene["captions/clip"][:]}
        torch.save({k: torch.from_numpy(v) for k, v in data.items()}, out / f"{sid}.pth")
        np.savetxt(out / f"{sid}_intrinsic.txt", scene["frames/intrinsic"][0])
        for v in range(scene.num_frames):
            Image.fromarray(scene["frames/color"][v]).save(out / f"{sid}_{v}.jpg", quality=95)
            Image.fromarray(scene["frames/depth"][v]).save(out / f"{sid}_{v}.png")
            np.savetxt(out / f"{sid}_{v}.txt", scene["frames/pose"][v])


class ReferenceDataset(torch.utils.data.Dataset):
    """The official loader's way: per sample, load the scene's points, read the view's colour,
    depth and pose files and compute the point->pixel mapping of all points on the fly."""

    def __init__(self, ref_dir: Path, scene_ids: list[str], views: dict[str, np.ndarray], loop: int,
                 seed: int) -> None:
        from storage.benchmarks import get_benchmark
        from storage.dataset import voxelize

        self.dir, self.scene_ids, self.views, self.loop, self.seed = ref_dir, scene_ids, views, loop, seed
        self.bench = get_benchmark("scannet20-b15n4")
        self.voxelize = voxelize

    def __len__(self) -> int:
        return len(self.scene_ids) * self.loop

    def __getitem__(self, i: int) -> dict:
        from preprocessing.projection import default_margin, openscene_mapping

        rng = np.random.default_rng([self.seed, 0, i])
        sid = self.scene_ids[i % len(self.scene_ids)]
        data = torch.load(self.dir / f"{sid}.pth")
        view = int(rng.choice(self.views[sid]))
        image = np.asarray(Image.open(self.dir / f"{sid}_{view}.jpg").convert("RGB"))
        depth = np.asarray(Image.open(self.dir / f"{sid}_{view}.png")).astype(np.float32) / 1000.0
        pose = np.loadtxt(self.dir / f"{sid}_{view}.txt")
        intrinsic = np.loadtxt(self.dir / f"{sid}_intrinsic.txt")
        m = openscene_mapping(pose, data["xyz"].numpy().astype(np.float64), depth, intrinsic,
                              default_margin(depth.shape[1]))
        point = np.flatnonzero(m[:, 2])
        coord = data["xyz"].numpy()[point]
        color = data["rgb"].numpy()[point].astype(np.float32) / 127.5 - 1
        vox, first, inverse = self.voxelize(coord, 0.02)
        label = self.bench.map_raw(data["label"].numpy()[point])
        return {"scene_id": sid, "view_index": view, "coord": coord, "color": color, "point_index": point,
                "voxel_coord": vox, "voxel_feat": color[first], "inverse": inverse,
                "label": label.astype(np.int64), "label_base": self.bench.to_base(label).astype(np.int64),
                "binary": self.bench.to_binary(label).astype(np.float32), "uv": m[point][:, [1, 0]],
                "image": np.ascontiguousarray(image.transpose(2, 0, 1)),
                "caption": data["clip"][view].float().numpy(), "has_caption": True}


def throughput(dataset, batch_size: int, workers: int, batches: int) -> float:
    from storage.dataset import collate_scenes

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                                         collate_fn=collate_scenes, persistent_workers=False)

    def forever():
        while True:
            yield from loader

    batches_iter = forever()
    next(batches_iter)  # worker start-up and first reads are not timed
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += len(next(batches_iter)["scene_id"])
    return samples / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmask3d-bench-loader"))
    ap.add_argument("--benchmark", default="scannet20-b15n4")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    from storage.dataset import SceneViewDataset

    args.work.mkdir(parents=True, exist_ok=True)
    store = args.store or build_store(args.work)
    ds = SceneViewDataset(store, args.benchmark, split="train", mode="train", loop=64, seed=0)
    ref_dir = args.work / f"reference2d-{store.parent.name}-{store.name}"
    if not ref_dir.is_dir():
        export_reference(store, ref_dir)
    ref = ReferenceDataset(ref_dir, ds.scene_ids, ds.valid_views, loop=64, seed=0)
    n_points = np.mean([len(ds[i]["coord"]) for i in range(min(8, len(ds)))])
    ours = throughput(ds, args.batch_size, args.workers, args.batches)
    base = throughput(ref, args.batch_size, args.workers, args.batches)
    print(f"store {store}: {len(ds.scene_ids)} train scenes, ~{n_points:.0f} visible points per sample, "
          f"batch {args.batch_size}, {args.workers} loader workers")
    print(f"SceneViewDataset (Zarr)           {ours:8.1f} samples/s")
    print(f"reference (official-style loader) {base:8.1f} samples/s")
    print(f"ratio {ours / base:.1f}x")


if __name__ == "__main__":
    main()
