"""Zarr store on S3: zarr's ``ObjectStore`` (obstore) vs ``FsspecStore`` (s3fs), local disk as reference.

Writes a few scenes' worth of schema-v1 arrays (points, one shard of frames, projections,
captions; real ScanNet sizes by default) through each backend, then reads them back the two ways
the pipeline does: a whole scene (points + projections, as evaluation does) and random single
views (one frame of color/depth + its projection slice, as the training loader does). Against an
S3 server: a moto server started on 127.0.0.1 by the script (default), or the endpoint and
credentials of the environment with ``--bucket`` (the bucket must exist).

    .venv/bin/python benchmarks/bench_object_store.py                       # moto, 3 scenes
    .venv/bin/python benchmarks/bench_object_store.py --scenes 2 --frames 20 --repeats 1
    AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... .venv/bin/python benchmarks/bench_object_store.py --bucket B
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from storage.location import parse_location
from storage.schema import create_array

SCENE_ARRAYS = ("points/xyz", "points/rgb", "points/nyu40", "points/category", "frames/index",
                "frames/pose", "frames/intrinsic", "proj/offsets", "proj/point", "proj/uv", "captions/clip")


def make_scene(rng: np.random.Generator, points: int, frames: int, size: tuple[int, int],
               visible: int, dim: int) -> dict[str, np.ndarray]:
    """Arrays with the schema's dtypes and realistic sizes (smooth images plus sensor noise)."""
    W, H = size
    yy, xx = np.mgrid[0:H, 0:W]
    base = ((xx[..., None] * [1, 2, 3] + yy[..., None] * [3, 1, 2]) % 256).astype(np.int16)
    color = np.stack([np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
                      for _ in range(frames)])
    depth = np.stack([(1500 + 3 * xx + 2 * yy + rng.integers(0, 20, (H, W))).astype(np.uint16)
                      for _ in range(frames)])
    counts = rng.integers(visible // 2, visible * 3 // 2, frames)
    return {
        "points/xyz": rng.normal(size=(points, 3)).astype(np.float32),
        "points/rgb": rng.integers(0, 256, (points, 3), dtype=np.uint8),
        "points/nyu40": rng.integers(0, 41, points, dtype=np.uint8),
        "points/category": rng.integers(0, 1200, points).astype(np.uint16),
        "frames/index": (np.arange(frames) * 20).astype(np.int32),
        "frames/pose": np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1)),
        "frames/intrinsic": np.tile(np.eye(3, dtype=np.float32), (frames, 1, 1)),
        "frames/color": color,
        "frames/depth": depth,
        "proj/offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "proj/point": np.concatenate([np.sort(rng.choice(points, c, replace=False)) for c in counts]
                                     ).astype(np.int32),
        "proj/uv": rng.integers(0, min(W, H), (int(counts.sum()), 2)).astype(np.uint16),
        "captions/clip": rng.normal(size=(frames, dim)).astype(np.float16),
    }


def write_scene(root: zarr.Group, scene_id: str, arrays: dict[str, np.ndarray]) -> None:
    group = root.create_group(f"scenes/{scene_id}")
    F, H, W = arrays["frames/depth"].shape
    for name in SCENE_ARRAYS:
        data = arrays[name]
        D = data.shape[1] if name == "captions/clip" else 0
        create_array(group, name, len(data), D=D)[...] = data
    for name in ("frames/color", "frames/depth"):  # one shard per scene, as the scene writer does
        create_array(group, name, F, H=H, W=W)[...] = arrays[name]
    group.attrs.update({"num_frames": F, "complete": True})


def read_scene(root: zarr.Group, scene_id: str) -> int:
    group = root[f"scenes/{scene_id}"]
    return sum(group[name][...].nbytes for name in SCENE_ARRAYS)


def read_view(root: zarr.Group, scene_id: str, view: int) -> int:
    group = root[f"scenes/{scene_id}"]
    lo, hi = (int(x) for x in group["proj/offsets"][view:view + 2])
    parts = (group["frames/color"][view], group["frames/depth"][view], group["proj/point"][lo:hi],
             group["proj/uv"][lo:hi], group["points/xyz"][...])
    return sum(p.nbytes for p in parts)


def run_backend(url: str, backend: str, scenes: list[dict[str, np.ndarray]], views: int,
                rng: np.random.Generator) -> dict[str, float]:
    loc = parse_location(url)
    root = zarr.open_group(loc.zarr_store(backend=backend), mode="w")
    nbytes = sum(a.nbytes for s in scenes for a in s.values())
    t0 = time.perf_counter()
    for i, arrays in enumerate(scenes):
        write_scene(root, f"scene{i:04d}_00", arrays)
    write_s = time.perf_counter() - t0
    reader = zarr.open_group(loc.zarr_store(read_only=True, backend=backend), mode="r")
    t0 = time.perf_counter()
    ids = sorted(reader["scenes"].group_keys())
    read_bytes = sum(read_scene(reader, sid) for sid in ids)
    read_s = time.perf_counter() - t0
    frames = scenes[0]["frames/depth"].shape[0]
    picks = [(ids[int(rng.integers(len(ids)))], int(rng.integers(frames))) for _ in range(views)]
    t0 = time.perf_counter()
    for sid, view in picks:
        read_view(reader, sid, view)
    view_s = time.perf_counter() - t0
    for sid, arrays in zip(ids, scenes, strict=True):  # what went in comes out
        np.testing.assert_array_equal(reader[f"scenes/{sid}/frames/color"][-1], arrays["frames/color"][-1])
    return {"write_MBps": nbytes / write_s / 1e6, "write_s": write_s,
            "read_MBps": read_bytes / read_s / 1e6, "read_s": read_s, "views_per_s": views / view_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--frames", type=int, default=40, help="kept frames per scene")
    parser.add_argument("--points", type=int, default=150_000)
    parser.add_argument("--size", default="640x480", help="stored frame size WxH (ScanNet depth size)")
    parser.add_argument("--visible", type=int, default=20_000, help="mean visible points per view")
    parser.add_argument("--views", type=int, default=60, help="random single-view reads")
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend; the median is reported")
    parser.add_argument("--bucket", help="an existing bucket; endpoint and credentials from the environment")
    args = parser.parse_args()
    W, H = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, args.points, args.frames, (W, H), args.visible, 512)
              for _ in range(args.scenes)]
    mb = sum(a.nbytes for s in scenes for a in s.values()) / 1e6
    print(f"{args.scenes} scenes x ({args.points} points, {args.frames} frames {W}x{H}): {mb:.0f} MB raw")

    proc = None
    work = Path(tempfile.mkdtemp(prefix="xmask3d-bench-objstore-"))
    if args.bucket is None:
        import boto3

        from tests.servers import s3_environment, start_moto

        proc, endpoint = start_moto(work / "moto.log")
        os.environ.update(s3_environment(endpoint, work))
        args.bucket = "xmask3d-bench"
        boto3.client("s3").create_bucket(Bucket=args.bucket)
        print(f"moto S3 server at {endpoint} (pid {proc.pid})")
    try:
        results: dict[str, list[dict[str, float]]] = {}
        for rep in range(args.repeats):
            for backend in ("obstore", "fsspec", "local"):
                url = str(work / f"local-{rep}.zarr") if backend == "local" else f"s3://{args.bucket}/{backend}-{rep}.zarr"
                r = run_backend(url, "obstore" if backend == "local" else backend, scenes, args.views,
                                np.random.default_rng(rep))
                results.setdefault(backend, []).append(r)
                figures = " ".join(f"{k}={v:.2f}" for k, v in r.items())
                print(f"  run {rep} {backend:8s} {figures}", flush=True)
        print("\n| backend | write MB/s | whole-scene read MB/s | random views/s |")
        print("|---|---|---|---|")
        for backend, runs in results.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            name = {"obstore": "S3, ObjectStore (obstore)", "fsspec": "S3, FsspecStore (s3fs)",
                    "local": "local disk, LocalStore"}[backend]
            print(f"| {name} | {med['write_MBps']:.1f} | {med['read_MBps']:.1f} | {med['views_per_s']:.1f} |")
    finally:
        if proc is not None:
            from tests.servers import stop

            stop(proc)


if __name__ == "__main__":
    main()
