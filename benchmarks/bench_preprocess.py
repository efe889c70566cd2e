"""Preprocessing end to end, cold, against the reference pipeline in the same run; steady state and
orchestration overhead separately.

Data: ``--scenes`` real-size ScanNet-format scenes (1296x968 colour JPEG, 640x480 zlib depth):
``--base-scenes`` scenes written by ``preprocessing.synthetic.write_scannet``, each ``.sens``
lengthened to ``--frames`` frames by repeating its frames in order, then hard-linked under new
scene ids (built once under ``--work`` and reused).

Measured, in this order, on the same data:
1. ours cold, end to end: ``xmask3d preprocess scannet --workers W`` in a fresh process (Python
   start, imports, Prefect's ephemeral API server, the Dask cluster, caption embedding, scenes,
   teardown); its ``preprocess stages:`` log line splits the time by stage.
2. the reference cold: ScanNet's ``SensorData`` reader (whole file in memory, per-byte
   ``struct.unpack``), full-size decode + nearest resize to 320x240, OpenScene's mapper per kept
   frame into a dense [F,N,3] int64 matrix, the captions embedded with the same encoder,
   ``torch.save``; ``--ref-processes`` processes, each a share of the scenes (fresh processes).
3. steady state: ``preprocess_scannet_scene`` called in this process (after a warm-up scene)
   against the same function as plain Dask tasks on a warm local cluster of 1 and of 2 workers
   (``preprocessing.run``; the interval between completions after each worker's first scene),
   and the workers' peak RSS and imported heavy modules.

    .venv/bin/python benchmarks/bench_preprocess.py                       # 16 scenes, no captions
    .venv/bin/python benchmarks/bench_preprocess.py --captions minilm     # view + region captions
    .venv/bin/python benchmarks/bench_preprocess.py --bucket --scenes 4 --frames 400   # store local vs S3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

FRAME_HEADER = 96  # camera_to_world (64) + 2 timestamps + 2 sizes
HEAVY = ("torch", "transformers", "sentence_transformers", "prefect")


def load() -> str:
    return os.getloadavg().__repr__()


def build_data(work: Path, scenes: int, base_scenes: int, frames: int, seed: int) -> Path:
    """``scenes`` real-size scenes: ``base_scenes`` generated ones, each ``.sens`` lengthened to
    ``frames`` frames (its frames repeated in order), then hard-linked under new scene ids."""
    from preprocessing.scannet.labels2d import LABEL_ZIP_SUFFIX, MEMBER
    from preprocessing.scannet.sens import SensReader
    from preprocessing.synthetic import write_scannet

    raw = work / f"raw-{scenes}of{base_scenes}x{frames}-s{seed}"
    if (raw / "captions.json").is_file():
        return raw
    base = work / f"base-{base_scenes}-s{seed}"
    if not (base / "captions.json").is_file():
        print(f"writing {base_scenes} real-size synthetic scenes (once) under {base} ...", flush=True)
        write_scannet(base, scenes=base_scenes, small=False, seed=seed, progress=True)
    long = work / f"long-{base_scenes}x{frames}-s{seed}"
    long.mkdir(parents=True, exist_ok=True)
    base_ids = sorted(p.name for p in (base / "scans").iterdir() if p.is_dir())
    captions = json.loads((base / "captions.json").read_text())
    regions = json.loads((base / "region_captions.json").read_text())
    long_caps, long_regions = {}, {}
    for scene_id in base_ids:
        reader = SensReader(base / "scans" / scene_id / f"{scene_id}.sens")
        target = long / f"{scene_id}.sens"
        if not target.is_file():
            data = reader.path.read_bytes()
            chunks, offset = [], reader.frames_offset
            for _ in range(reader.num_frames):
                color_bytes, depth_bytes = struct.unpack_from("<QQ", data, offset + 80)
                end = offset + FRAME_HEADER + color_bytes + depth_bytes
                chunks.append(data[offset:end])
                offset = end
            header = bytearray(data[:reader.frames_offset])
            struct.pack_into("<Q", header, reader.frames_offset - 8, frames)
            with open(target.with_suffix(".tmp"), "wb") as f:
                f.write(header)
                for k in range(frames):
                    f.write(chunks[k % len(chunks)])
            target.with_suffix(".tmp").rename(target)
        n = reader.num_frames
        labels = long / f"{scene_id}{LABEL_ZIP_SUFFIX}"
        source_labels = base / "scans" / scene_id / labels.name
        if source_labels.is_file() and not labels.is_file():  # 2D label images, one per lengthened frame
            with zipfile.ZipFile(source_labels) as src:
                pngs = {int(m.group(1)): src.read(name) for name in src.namelist()
                        if (m := MEMBER.fullmatch(name))}
            with zipfile.ZipFile(labels.with_suffix(".tmp"), "w", zipfile.ZIP_STORED) as dst:
                for k in range(frames):
                    dst.writestr(f"label-filt/{k}.png", pngs[k % n])
            labels.with_suffix(".tmp").rename(labels)
        long_caps[scene_id] = {str(k): captions[scene_id][str(k % n)] for k in range(frames)
                               if str(k % n) in captions[scene_id]}
        scene_regions = regions["scenes"][scene_id]
        long_regions[scene_id] = {str(k): scene_regions[str(k % n)] for k in range(frames)
                                  if str(k % n) in scene_regions}
    tmp = work / "tmp-raw"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "scans").mkdir(parents=True)
    ids = [f"scene{k:04d}_00" for k in range(scenes)]
    all_caps, all_regions = {}, {}
    for k, scene_id in enumerate(ids):
        source = base_ids[k % len(base_ids)]
        scene_dir = tmp / "scans" / scene_id
        scene_dir.mkdir()
        for path in (base / "scans" / source).iterdir():
            name = path.name.replace(source, scene_id)
            lengthened = long / path.name
            os.link(lengthened if path.suffix in (".sens", ".zip") else path, scene_dir / name)
        all_caps[scene_id] = long_caps[source]
        all_regions[scene_id] = long_regions[source]
    n_val = max(1, scenes // 4)
    (tmp / "scannetv2_train.txt").write_text("".join(f"{s}\n" for s in ids[:-n_val]))
    (tmp / "scannetv2_val.txt").write_text("".join(f"{s}\n" for s in ids[-n_val:]))
    shutil.copy(base / "scannetv2-labels.combined.tsv", tmp)
    (tmp / "captions.json").write_text(json.dumps(all_caps))
    (tmp / "region_captions.json").write_text(json.dumps({**regions, "scenes": all_regions}))
    tmp.rename(raw)
    return raw


# ------------------------------------------------------------------------------------------
# Reference pipeline (ScanNet SensorData + OpenScene mapper + torch.save)


class RGBDFrame:
    def load(self, f) -> None:
        pose = struct.unpack("f" * 16, f.read(16 * 4))
        self.camera_to_world = np.asarray(pose, dtype=np.float32).reshape(4, 4)
        self.timestamp_color = struct.unpack("Q", f.read(8))[0]
        self.timestamp_depth = struct.unpack("Q", f.read(8))[0]
        self.color_size_bytes = struct.unpack("Q", f.read(8))[0]
        self.depth_size_bytes = struct.unpack("Q", f.read(8))[0]
        self.color_data = b"".join(struct.unpack("c" * self.color_size_bytes, f.read(self.color_size_bytes)))
        self.depth_data = b"".join(struct.unpack("c" * self.depth_size_bytes, f.read(self.depth_size_bytes)))


class SensorData:
    """ScanNet's SensorData.py reader: the whole file is loaded into memory."""

    def __init__(self, filename: Path) -> None:
        with open(filename, "rb") as f:
            struct.unpack("I", f.read(4))
            strlen = struct.unpack("Q", f.read(8))[0]
            self.sensor_name = b"".join(struct.unpack("c" * strlen, f.read(strlen))).decode()
            self.intrinsic_color = np.asarray(struct.unpack("f" * 16, f.read(64)), np.float32).reshape(4, 4)
            self.extrinsic_color = np.asarray(struct.unpack("f" * 16, f.read(64)), np.float32).reshape(4, 4)
            self.intrinsic_depth = np.asarray(struct.unpack("f" * 16, f.read(64)), np.float32).reshape(4, 4)
            self.extrinsic_depth = np.asarray(struct.unpack("f" * 16, f.read(64)), np.float32).reshape(4, 4)
            struct.unpack("i", f.read(4))
            struct.unpack("i", f.read(4))
            self.color_width = struct.unpack("I", f.read(4))[0]
            self.color_height = struct.unpack("I", f.read(4))[0]
            self.depth_width = struct.unpack("I", f.read(4))[0]
            self.depth_height = struct.unpack("I", f.read(4))[0]
            self.depth_shift = struct.unpack("f", f.read(4))[0]
            num_frames = struct.unpack("Q", f.read(8))[0]
            self.frames = []
            for _ in range(num_frames):
                frame = RGBDFrame()
                frame.load(f)
                self.frames.append(frame)




def reference_scene(raw: Path, scene_id: str, out: Path, frame_step: int, encoder) -> int:
    """One scene the reference way; returns the bytes written."""
    import torch
    from PIL import Image

    from preprocessing.captions import embed_captions
    from preprocessing.projection import default_margin, openscene_mapping
    from preprocessing.scannet.mesh import read_scannet_scene
    from preprocessing.scannet.sens import rescale_intrinsic

    W, H = 320, 240
    sd = SensorData(raw / "scans" / scene_id / f"{scene_id}.sens")
    mesh = read_scannet_scene(raw / "scans" / scene_id, raw / "scannetv2-labels.combined.tsv")
    K = rescale_intrinsic(sd.intrinsic_depth, (sd.depth_width, sd.depth_height), (W, H)).astype(np.float64)
    coords = mesh.xyz.astype(np.float64)
    captions = json.loads((raw / "captions.json").read_text())[scene_id] if encoder else {}
    mappings, texts, colors = [], [], []
    for i in range(0, len(sd.frames), frame_step):
        frame = sd.frames[i]
        if not np.isfinite(frame.camera_to_world).all():
            continue
        color = np.asarray(Image.open(io.BytesIO(frame.color_data)).convert("RGB"))
        colors.append(np.asarray(Image.fromarray(color).resize((W, H), Image.NEAREST)))
        depth = np.frombuffer(zlib.decompress(frame.depth_data), dtype=np.uint16)
        depth = depth.reshape(sd.depth_height, sd.depth_width)
        depth = np.asarray(Image.fromarray(depth).resize((W, H), Image.NEAREST)).astype(np.float32)
        depth /= sd.depth_shift
        mappings.append(openscene_mapping(frame.camera_to_world.astype(np.float64), coords, depth, K,
                                          default_margin(W)))
        texts.append(captions.get(str(i), ""))
    payload = {"mapping": torch.from_numpy(np.stack(mappings)),  # [F, N, 3] int64
               "color": torch.from_numpy(np.stack(colors)), "captions": texts}
    if encoder is not None:
        payload["clip"] = torch.from_numpy(embed_captions(texts, encoder))
    path = out / f"{scene_id}.pth"
    torch.save(payload, path)
    return path.stat().st_size


def run_reference(raw: Path, out: Path, scene_ids: list[str], frame_step: int, text_encoder: str) -> None:
    """Entry point of a reference subprocess (so its time and peak RSS are its own)."""
    start = time.perf_counter()
    import torch  # noqa: F401 - the reference's imports are part of its cold start

    encoder = None
    if text_encoder != "none":
        from preprocessing.caption_embed import text_encoder as build

        encoder = build(text_encoder)
    setup = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    scene_seconds = []
    for sid in scene_ids:
        t = time.perf_counter()
        reference_scene(raw, sid, out, frame_step, encoder)
        scene_seconds.append(time.perf_counter() - t)
    print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "setup_s": setup, "scene_s": scene_seconds}))


def reference(args, raw: Path, scene_ids: list[str]) -> tuple[float, list[float], list[float]]:
    """Wall time of the reference in ``--ref-processes`` processes; -> (wall, setups, scene times)."""
    out = args.work / "reference"
    shutil.rmtree(out, ignore_errors=True)
    shares = [scene_ids[k::args.ref_processes] for k in range(args.ref_processes)]
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--reference-only", str(raw),
                               "--work", str(args.work), "--frame-step", str(args.frame_step),
                               "--captions", args.captions, "--ref-scenes", ",".join(share)],
                              stdout=subprocess.PIPE, text=True)
             for share in shares if share]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t
    if any(p.returncode for p in procs):
        raise SystemExit("reference failed")
    stats = [json.loads(o.strip().splitlines()[-1]) for o in outputs]
    return wall, [s["setup_s"] for s in stats], [x for s in stats for x in s["scene_s"]]


def ours_cold(args, raw: Path, workers: int) -> tuple[float, str]:
    """``xmask3d preprocess scannet`` in a fresh process; -> (wall seconds, its stage line)."""
    store = args.work / f"cold-{workers}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    captions = "none" if args.captions == "none" else str(raw / "captions.json")
    regions = "none" if args.captions == "none" else str(raw / "region_captions.json")
    cli = Path(sys.executable).parent / "xmask3d"  # the console script, as a user runs it
    cmd = [str(cli), "preprocess", "scannet", "--raw", str(raw), "--out", str(store),
           "--workers", str(workers),
           "--frame-step", str(args.frame_step), "--captions", captions, "--region-captions", regions]
    if args.captions != "none":
        cmd += ["--text-encoder", args.captions]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"ours failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    found = re.findall(r"preprocess stages: (.*)", proc.stdout + proc.stderr)
    return wall, found[-1].strip() if found else "?"


def steady_in_process(raw: Path, work: Path, cfg, listing: dict[str, str], n: int,
                      store: Path | str | None = None) -> list[float]:
    """Seconds per scene of the plain function in this process, after one warm-up scene
    (into ``store`` when given: a fresh bucket URL; else a fresh local store under ``work``)."""
    from preprocessing.pipeline import prepare_store, preprocess_scannet_scene
    from preprocessing.run import embed_run_captions

    if store is None:
        store = work / "inprocess.zarr"
        shutil.rmtree(store, ignore_errors=True)
    ids = list(listing)[: n + 1]
    listing, cfg = prepare_store("scannet", raw, store, cfg, ids)
    table = embed_run_captions("scannet", ids, cfg)
    times = []
    for sid in ids:
        t = time.perf_counter()
        preprocess_scannet_scene(raw, sid, store, cfg, listing[sid], table)
        times.append(time.perf_counter() - t)
    return times[1:]


def steady_in_workers(raw: Path, work: Path, cfg, workers: int) -> dict:
    """All scenes as plain Dask tasks on a warm local cluster of ``workers``; completion times."""
    from preprocessing.pipeline import prepare_store
    from preprocessing.run import SceneCluster, embed_run_captions, scene_results, submit_scenes
    from tests.worker_probe import heavy_modules, peak_rss_mb

    store = work / f"workers-{workers}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    listing, cfg = prepare_store("scannet", raw, store, cfg)
    with SceneCluster(None, workers, len(listing)) as cluster:
        t = time.perf_counter()
        table = embed_run_captions("scannet", listing, cfg)
        caption_s = time.perf_counter() - t
        client = cluster.client
        client.run(lambda: None)  # every worker up
        t = time.perf_counter()
        done, inside = [], []
        for summary in scene_results(submit_scenes(client, "scannet", raw, store, listing, cfg, table)):
            assert summary.status == "written", summary
            done.append(time.perf_counter() - t)
            inside.append(summary.seconds)
        rss = list(client.run(peak_rss_mb).values())
        heavy = sorted({m for mods in client.run(heavy_modules).values() for m in mods})
    steady = (len(done) - workers) / (done[-1] - done[workers - 1])
    return {"scenes_per_s": steady, "total_s": done[-1], "inside_s": inside[workers:], "rss_mb": rss,
            "heavy": heavy, "caption_s": caption_s, "texts": len(table.texts) if table else 0}


def bucket_vs_local(raw: Path, args: argparse.Namespace, cfg, listing: dict[str, str]) -> None:
    """The plain per-scene function into a local store and into a bucket (moto on 127.0.0.1), same scenes."""
    import boto3

    from tests.servers import s3_environment, start_moto, stop

    proc, endpoint = start_moto(args.work / "moto.log")
    os.environ.update(s3_environment(endpoint, args.work))
    boto3.client("s3").create_bucket(Bucket="xmask3d-bench-preprocess")
    try:
        for rep in range(2):
            for where, store in (("local", None), ("bucket", f"s3://xmask3d-bench-preprocess/run{rep}.zarr")):
                times = steady_in_process(raw, args.work, cfg, listing, args.in_process_scenes, store)
                print(f"run {rep} {where:6s}: {np.median(times):.2f} s per scene (median of {len(times)} "
                      f"after a warm-up: {', '.join(f'{t:.2f}' for t in times)}); load {load()}", flush=True)
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--base-scenes", type=int, default=2, help="generated scenes; the rest are hard links")
    ap.add_argument("--frames", type=int, default=1200, help="frames per .sens")
    ap.add_argument("--frame-step", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="workers of the cold end-to-end run")
    ap.add_argument("--ref-processes", type=int, default=2)
    ap.add_argument("--ref-sample", type=int, default=0,
                    help="run the reference on this many scenes only and scale its time to all of them "
                         "(it is linear in the scenes; 0 = all scenes)")
    ap.add_argument("--captions", default="none", help="none, or the text encoder (minilm, openclip-tiny)")
    ap.add_argument("--in-process-scenes", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmask3d-bench-preprocess"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ref-scenes", help=argparse.SUPPRESS)
    ap.add_argument("--bucket", action="store_true",
                    help="only: the in-process steady state into a local store vs into an S3 bucket (moto)")
    args = ap.parse_args()
    if args.reference_only:
        run_reference(args.reference_only, args.work / "reference", args.ref_scenes.split(","),
                      args.frame_step, args.captions)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.worker_probe

    args.work.mkdir(parents=True, exist_ok=True)
    raw = build_data(args.work, args.scenes, args.base_scenes, args.frames, args.seed)
    scene_ids = sorted(p.name for p in (raw / "scans").iterdir())
    sens = {p.stat().st_ino: p for p in raw.glob("scans/*/*.sens")}  # hard links: one file each
    print(f"data: {args.scenes} scenes ({args.base_scenes} generated, hard-linked) x {args.frames} "
          f"frames, frame step {args.frame_step}, captions {args.captions}; load average at start {load()}",
          flush=True)
    for p in sens.values():  # warm the page cache for every run alike
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    if args.bucket:
        from preprocessing.pipeline import PreprocessConfig

        cfg = PreprocessConfig(frame_step=args.frame_step, show_progress=False)
        bucket_vs_local(raw, args, cfg, {s: "train" for s in scene_ids})
        return

    cold, stages = ours_cold(args, raw, args.workers)
    print(f"ours cold end to end ({args.workers} workers): {cold:.1f} s; stages: {stages}; load {load()}",
          flush=True)
    sample = scene_ids[: args.ref_sample] if args.ref_sample else scene_ids
    ref_wall, ref_setup, ref_scenes = reference(args, raw, sample)
    ref_scene = float(np.mean(ref_scenes))
    print(f"reference cold ({args.ref_processes} processes, {len(sample)} scenes): {ref_wall:.1f} s (set-up "
          f"{max(ref_setup):.1f} s, {ref_scene:.2f} s per scene); load {load()}", flush=True)
    if len(sample) < len(scene_ids):
        measured = ref_wall
        ref_wall = max(ref_setup) + ref_scene * -(-len(scene_ids) // args.ref_processes)
        print(f"reference for all {len(scene_ids)} scenes, scaled from the sample: {ref_wall:.1f} s "
              f"(set-up + per-scene time x scenes per process; the sample took {measured:.1f} s)", flush=True)

    from preprocessing.pipeline import PreprocessConfig

    with_captions = args.captions != "none"
    cfg = PreprocessConfig(frame_step=args.frame_step, show_progress=False,
                           captions=raw / "captions.json" if with_captions else None,
                           region_captions=raw / "region_captions.json" if with_captions else None,
                           text_encoder=args.captions if with_captions else "minilm")
    listing = {s: "train" for s in scene_ids}
    t = time.perf_counter()
    inproc = steady_in_process(raw, args.work, cfg, listing, args.in_process_scenes)
    one = float(np.median(inproc))
    print(f"in process: {one:.2f} s per scene (median of {len(inproc)} after a warm-up; "
          f"{time.perf_counter() - t:.1f} s in all, captions embedded first); load {load()}", flush=True)
    runs = {}
    for workers in (1, 2):
        runs[workers] = r = steady_in_workers(raw, args.work, cfg, workers)
        print(f"{workers} worker(s): {r['scenes_per_s']:.2f} scenes/s steady ({1 / r['scenes_per_s']:.2f} s "
              f"per scene), function inside the worker {np.median(r['inside_s']):.2f} s, all scenes "
              f"{r['total_s']:.1f} s; worker peak RSS {', '.join(f'{v:.0f}' for v in r['rss_mb'])} MB; "
              f"heavy modules in workers: {r['heavy'] or 'none'}; captions {r['caption_s']:.2f} s "
              f"({r['texts']} texts); load {load()}", flush=True)

    per_scene_1 = 1 / runs[1]["scenes_per_s"]
    n = len(scene_ids)
    print("\nsummary")
    print(f"  per scene: in process {one:.2f} s, in 1 worker {per_scene_1:.2f} s "
          f"-> {per_scene_1 / one:.2f}x (overhead {100 * (per_scene_1 / one - 1):+.0f} %, target <= 1.3x); "
          f"the function itself in the worker {np.median(runs[1]['inside_s']):.2f} s")
    print(f"  scenes/s: 1 worker {runs[1]['scenes_per_s']:.2f}, 2 workers {runs[2]['scenes_per_s']:.2f}; "
          f"reference {args.ref_processes / ref_scene:.2f} ({args.ref_processes} processes)")
    print(f"  end to end cold: ours {cold:.1f} s vs reference {ref_wall:.1f} s -> {ref_wall / cold:.1f}x "
          f"(target >= 5x)")
    print(f"  steady state: ours {runs[args.workers]['scenes_per_s']:.2f} scenes/s vs reference "
          f"{args.ref_processes / ref_scene:.2f} -> "
          f"{runs[args.workers]['scenes_per_s'] * ref_scene / args.ref_processes:.1f}x (target >= 10x)")
    compute = n / runs[args.workers]["scenes_per_s"]
    print(f"  orchestration overhead of the cold run: {cold - compute:.1f} s of {cold:.1f} s "
          f"(cold minus {n} scenes at the steady rate, {compute:.1f} s); stages: {stages}")
    print(f"  load average at end {load()}")


if __name__ == "__main__":
    main()
