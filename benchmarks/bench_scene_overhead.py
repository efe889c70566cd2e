"""Per-scene time inside the pipeline's Dask worker vs the same function in this process, same run.

Data: the real-size scenes of ``bench_preprocess.py`` (built once under ``--work``, reused).
Measured on the same scenes, in this order: ``preprocess_scannet_scene`` called in this process
(after one warm-up scene), then the same function as plain Dask tasks on a warm 1-worker
``preprocessing.run.SceneCluster`` (the interval between completions after a warm-up scene), and,
with ``--dask-default-malloc``, once more on a worker started with Dask's default allocator
settings (``MALLOC_TRIM_THRESHOLD_=65536`` alone) to show what ``run.WORKER_MALLOC`` changes; that one runs
first, because the nanny leaves the variables it sets for a spawn in this process's environment.

    .venv/bin/python benchmarks/bench_scene_overhead.py --dask-default-malloc
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_preprocess import build_data  # noqa: E402
from distributed import as_completed  # noqa: E402

from preprocessing import run  # noqa: E402
from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_scene_safe  # noqa: E402


def in_process(raw: Path, out: Path, ids: list[str]) -> list[float]:
    shutil.rmtree(out, ignore_errors=True)
    listing, cfg = prepare_store("scannet", raw, out, PreprocessConfig(captions=None, region_captions=None,
                                                                       show_progress=False), scenes=ids)
    times = []
    for scene_id in ids:
        start = time.perf_counter()
        preprocess_scene_safe("scannet", raw, scene_id, out, cfg, listing[scene_id])
        times.append(time.perf_counter() - start)
    return times[1:]  # the first one warms imports and caches


def in_worker(raw: Path, out: Path, ids: list[str]) -> list[float]:
    shutil.rmtree(out, ignore_errors=True)
    listing, cfg = prepare_store("scannet", raw, out, PreprocessConfig(captions=None, region_captions=None,
                                                                       show_progress=False), scenes=ids)
    with run.SceneCluster(None, 1, len(ids)) as cluster:
        client = cluster.client

        def submit(scene_id: str):
            return client.submit(preprocess_scene_safe, "scannet", raw, scene_id, out, cfg, listing[scene_id],
                                 pure=False)

        submit(ids[0]).result()  # warm-up
        start, stamps = time.perf_counter(), []
        for future in as_completed([submit(s) for s in ids[1:]]):
            future.result()
            stamps.append(time.perf_counter())
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--frames", type=int, default=1200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmask3d-bench-preprocess"))
    ap.add_argument("--dask-default-malloc", action="store_true",
                    help="also measure a worker with Dask's allocator settings only")
    args = ap.parse_args()
    raw = build_data(args.work, max(args.scenes, 2), 2, args.frames, 0)
    ids = [f"scene{k:04d}_00" for k in range(args.scenes)]
    out = args.work / "overhead.zarr"
    print(f"{args.scenes} scenes x {args.frames} frames; load average at start {os.getloadavg()}", flush=True)
    rows = [("in process", in_process(raw, out, ids))]
    if args.dask_default_malloc:  # first: the nanny leaves its spawn variables in this process's environ
        saved = dict(run.WORKER_MALLOC)
        run.WORKER_MALLOC.clear()
        rows.append(("worker (Dask default malloc)", in_worker(raw, out, ids)))
        run.WORKER_MALLOC.update(saved)
    rows.append(("worker (run.WORKER_MALLOC)", in_worker(raw, out, ids)))
    base = statistics.median(rows[0][1])
    for name, times in rows:
        median = statistics.median(times)
        print(f"{name:30s} median {median:.2f} s/scene ({median / base:.2f}x in process)  "
              f"[{', '.join(f'{t:.2f}' for t in times)}]")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
