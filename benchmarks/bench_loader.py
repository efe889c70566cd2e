"""Training loader throughput: samples/s of ``SceneViewDataset`` + ``collate_scenes`` in a DataLoader.

Random access over a store of ``--scenes`` scenes (default 64: the scenes of ``--store`` repeated
under new ids with hard links), shuffled, train mode. Three loaders in the same run:

- ours: ``SceneViewDataset`` reads per sample one view's slice of ``proj/*``, the visible points'
  rows, one colour frame and one label image;
- whole-scene: the previous design, the same samples from whole-scene arrays (points, all
  correspondences, captions) read into memory behind a 4-scene LRU cache;
- official-style: per sample a ``torch.load`` of the scene's .pth (points, labels), the view's
  colour JPEG, 16-bit depth PNG, label PNG and pose text, and OpenScene's mapper over all points.

    .venv/bin/python benchmarks/bench_loader.py --store STORE.zarr --scenes 64 --batches 40
    .venv/bin/python benchmarks/bench_loader.py            # builds 3 small synthetic scenes first
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_scannet_scene
from preprocessing.projection import default_margin, openscene_mapping
from preprocessing.synthetic import write_scannet
from storage.benchmarks import get_benchmark
from storage.dataset import SceneHandle, SceneViewDataset, collate_scenes, voxelize
from storage.store import open_store


def build_store(work: Path) -> Path:
    """3 small synthetic scenes preprocessed (once) into a store under ``work``."""

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


def replicate_store(base: Path, out: Path, scenes: int) -> Path:
    """A store of ``scenes`` train scenes: the base store's scenes repeated (hard links) under new ids."""
    if (out / "zarr.json").is_file() and len(os.listdir(out / "scenes")) >= scenes + 1:
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "scenes").mkdir(parents=True)
    shutil.copy(base / "zarr.json", out / "zarr.json")
    shutil.copy(base / "scenes" / "zarr.json", out / "scenes" / "zarr.json")
    ids = sorted(p.name for p in (base / "scenes").iterdir() if p.is_dir() and not p.name.startswith("."))
    for k in range(scenes):
        src = base / "scenes" / ids[k % len(ids)]
        dst = out / "scenes" / f"rep{k:04d}-{src.name}"
        shutil.copytree(src, dst, copy_function=os.link)
        meta = json.loads((dst / "zarr.json").read_text())
        meta["attributes"]["split"] = "train"
        (dst / "zarr.json").unlink()  # a new file: the base scene keeps its own attrs
        (dst / "zarr.json").write_text(json.dumps(meta))
    return out


def export_reference(store_path: Path, out: Path) -> None:
    """The official data layout: one .pth per scene (points, labels) and, per view, a colour
    JPEG, a 16-bit depth PNG, an 8-bit NYU40 label PNG and a pose text file (as OpenScene's and
    ScanNet's 2D export write them). Repeated scenes get hard links of their base scene's files."""
    store = open_store(store_path)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    for sid in store.scene_ids():
        base = sid.split("-", 1)[-1]
        if base in done:
            shutil.copytree(out / done[base], out / sid, copy_function=os.link)
            continue
        scene = store.scene(sid)
        d = out / sid
        d.mkdir()
        data = {"xyz": scene["points/xyz"][:], "rgb": scene["points/rgb"][:],
                "label": scene["points/nyu40"][:].astype(np.int64), "clip": scene["captions/clip"][:]}
        torch.save({k: torch.from_numpy(v) for k, v in data.items()}, d / "scene.pth")
        np.savetxt(d / "intrinsic.txt", scene["frames/intrinsic"][0])
        for v in range(scene.num_frames):
            Image.fromarray(scene["frames/color"][v]).save(d / f"{v}.jpg", quality=95)
            Image.fromarray(scene["frames/depth"][v]).save(d / f"{v}_depth.png")
            Image.fromarray(scene["frames/nyu40"][v]).save(d / f"{v}_label.png")
            np.savetxt(d / f"{v}.txt", scene["frames/pose"][v])
        done[base] = sid


class WholeSceneDataset(SceneViewDataset):
    """The previous loader design, for comparison: ``SceneViewDataset`` whose scenes are read whole
    (points, labels, all correspondences, captions) into memory, 4 scenes cached per process."""

    @functools.lru_cache(maxsize=4)  # noqa: B019 - as the previous design
    def _handle(self, scene_id: str) -> SceneHandle:
        handle = SceneHandle.open(self.store.scene(scene_id), self.benchmark)
        arrays = {n: (a if n.startswith("frames/") else _InMemory(a[:])) for n, a in handle.arrays.items()}
        return SceneHandle(arrays, handle.offsets, handle.num_points, handle.benchmark, handle.label_field)


class _InMemory(np.ndarray):
    """A numpy array with zarr's ``oindex`` (orthogonal selection) spelling."""

    def __new__(cls, array: np.ndarray):
        return np.asarray(array).view(cls)

    @property
    def oindex(self) -> np.ndarray:
        return np.asarray(self)


class ReferenceDataset(torch.utils.data.Dataset):
    """The official loader's way: per sample, load the scene's points, read the view's colour,
    depth, label and pose files and compute the point->pixel mapping of all points on the fly."""

    def __init__(self, ref_dir: Path, scene_ids: list[str], views: dict[str, np.ndarray], loop: int,
                 seed: int) -> None:
        self.dir, self.scene_ids, self.views, self.loop, self.seed = ref_dir, scene_ids, views, loop, seed
        self.bench = get_benchmark("scannet20-b15n4")
        self.voxelize = voxelize

    def __len__(self) -> int:
        return len(self.scene_ids) * self.loop

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, 0, i])
        sid = self.scene_ids[i % len(self.scene_ids)]
        d = self.dir / sid
        data = torch.load(d / "scene.pth")
        view = int(rng.choice(self.views[sid]))
        image = np.asarray(Image.open(d / f"{view}.jpg").convert("RGB"))
        depth = np.asarray(Image.open(d / f"{view}_depth.png")).astype(np.float32) / 1000.0
        label_2d = self.bench.to_base(self.bench.map_raw(np.asarray(Image.open(d / f"{view}_label.png"))))
        pose = np.loadtxt(d / f"{view}.txt")
        intrinsic = np.loadtxt(d / "intrinsic.txt")
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
                "image": np.ascontiguousarray(image.transpose(2, 0, 1)), "label_2d": label_2d,
                "caption": data["clip"][view].float().numpy(), "has_caption": True}


def throughput(dataset, batch_size: int, workers: int, batches: int, seed: int = 0) -> float:
    """Samples/s over ``batches`` shuffled batches (random scenes), after one untimed batch."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True,
                                         collate_fn=collate_scenes, persistent_workers=False,
                                         generator=torch.Generator().manual_seed(seed))

    def forever():
        while True:
            yield from loader

    batches_iter = forever()
    next(batches_iter)  # worker start-up and first reads are not timed
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += len(next(batches_iter)["scene_id"])
    return samples / (time.perf_counter() - start)


def bucket_vs_local(base: Path, args: argparse.Namespace) -> None:
    """SceneViewDataset samples/s on ``base`` and on the same store uploaded into a bucket."""
    import os

    import boto3

    from tests.servers import s3_environment, start_moto, stop

    proc = None
    if args.bucket_name is None:
        proc, endpoint = start_moto(args.work / "moto.log")
        os.environ.update(s3_environment(endpoint, args.work))
        args.bucket_name = "xmask3d-bench-loader"
        boto3.client("s3").create_bucket(Bucket=args.bucket_name)
    try:
        client = boto3.client("s3")
        prefix = f"bench-loader/{base.stem}.zarr"
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".writer.lock"):
                key = f"{prefix}/{path.relative_to(base).as_posix()}"
                client.upload_file(str(path), args.bucket_name, key)
        url = f"s3://{args.bucket_name}/{prefix}"
        print(f"load before: {load()}")
        rates = {}
        for name, where in (("local", base), ("bucket", url)):
            ds = SceneViewDataset(where, args.benchmark, split="train", mode="train", loop=4, seed=0)
            rates[name] = throughput(ds, args.batch_size, args.workers, args.batches)
        print(f"load after:  {load()}")
        print(f"store {base} ({len(ds.scene_ids)} train scenes), batch {args.batch_size}, "
              f"{args.workers} loader workers")
        print(f"SceneViewDataset, local store     {rates['local']:8.1f} samples/s")
        print(f"SceneViewDataset, {url}  {rates['bucket']:8.1f} samples/s")
        print(f"bucket / local {rates['bucket'] / rates['local']:.2f}")
    finally:
        if proc is not None:
            stop(proc)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="base store (default: build 3 small synthetic scenes)")
    ap.add_argument("--scenes", type=int, default=64, help="scenes of the benchmark store (repeats)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmask3d-bench-loader"))
    ap.add_argument("--benchmark", default="scannet20-b15n4")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--bucket", action="store_true",
                    help="instead: the base store local vs copied into a bucket (moto on 127.0.0.1, or "
                         "the environment's S3 with --bucket-name)")
    ap.add_argument("--bucket-name", help="an existing bucket of the environment's S3 endpoint")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = (args.store or build_store(args.work)).resolve()
    if args.bucket:
        bucket_vs_local(base, args)
        return
    name = f"{base.parent.name}-{base.stem}-x{args.scenes}.zarr"
    store = replicate_store(base, args.work / name, args.scenes)
    ds = SceneViewDataset(store, args.benchmark, split="train", mode="train", loop=4, seed=0)
    whole = WholeSceneDataset(store, args.benchmark, split="train", mode="train", loop=4, seed=0)
    ref_dir = args.work / f"reference-{store.stem}"
    if not ref_dir.is_dir():
        export_reference(store, ref_dir)
    ref = ReferenceDataset(ref_dir, ds.scene_ids, ds.valid_views, loop=4, seed=0)
    n_points = np.mean([len(ds[i]["coord"]) for i in range(min(8, len(ds)))])
    frames = np.mean([len(v) for v in ds.valid_views.values()])
    print(f"load before: {load()}")
    rates = {name: throughput(d, args.batch_size, args.workers, args.batches)
             for name, d in (("ours", ds), ("whole", whole), ("official", ref))}
    print(f"load after:  {load()}")
    print(f"store {store}: {len(ds.scene_ids)} train scenes (repeats of {base}), ~{frames:.0f} valid views "
          f"and ~{n_points:.0f} visible points per view, batch {args.batch_size}, "
          f"{args.workers} loader workers")
    print(f"SceneViewDataset (one view per sample)          {rates['ours']:8.1f} samples/s")
    print(f"whole-scene arrays, 4-scene cache (previous)    {rates['whole']:8.1f} samples/s")
    print(f"official-style (.pth + image files + mapper)    {rates['official']:8.1f} samples/s")
    print(f"ours / previous {rates['ours'] / rates['whole']:.1f}x, ours / official "
          f"{rates['ours'] / rates['official']:.1f}x")


if __name__ == "__main__":
    main()
