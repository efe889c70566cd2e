"""Preprocessing end to end: ``run_preprocess`` (Dask, streaming) vs the reference pipeline.

Data: real-size synthetic ScanNet scenes (1296x968 colour JPEG, 640x480 zlib depth) written by
``preprocessing.synthetic.write_scannet``; each scene's ``.sens`` is then lengthened to
``--frames`` frames by repeating its frames in order (so a kept frame every ``--frame-step``).
The data is built once under ``--work`` and reused.

Reference (what earlier code bases do): ScanNet's ``SensorData`` reads the whole ``.sens`` into
memory (struct unpacking per field), decodes each kept frame at full size and resizes it to
320x240 (nearest), OpenScene's mapper projects every point into each kept frame (float64, per
frame) into a dense [F,N,3] int64 mapping, captions are embedded with the same encoder, and
``torch.save`` writes the mapping. It runs in one process, scene after scene (as the scripts do).

Printed: wall time of both, speed ratio, peak RSS of each Dask worker and of the reference
process, and the store bytes of ``proj/*`` against a dense N x F int64 matrix.

    .venv/bin/python benchmarks/bench_preprocess.py                  # 2 scenes x 1000 frames
    .venv/bin/python benchmarks/bench_preprocess.py --scenes 4 --frames 2000 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

FRAME_HEADER = 96  # camera_to_world (64) + 2 timestamps + 2 sizes


def build_data(work: Path, scenes: int, frames: int, seed: int) -> Path:
    """Real-size synthetic scenes whose .sens files hold ``frames`` frames (repeated in order)."""
    from preprocessing.scannet.sens import SensReader
    from preprocessing.synthetic import write_scannet

    raw = work / f"raw-{scenes}x{frames}-s{seed}"
    if (raw / "captions.json").is_file():
        return raw
    base = work / f"base-{scenes}-s{seed}"
    if not (base / "captions.json").is_file():
        print(f"writing {scenes} real-size synthetic scenes (once) under {base} ...", flush=True)
        write_scannet(base, scenes=scenes, small=False, seed=seed, progress=True)
    tmp = work / "tmp-raw"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.sens"))
    captions = json.loads((base / "captions.json").read_text())
    for sens_path in sorted(base.glob("scans/*/*.sens")):
        reader = SensReader(sens_path)
        data = sens_path.read_bytes()
        chunks, offset = [], reader.frames_offset
        for _ in range(reader.num_frames):
            color_bytes, depth_bytes = struct.unpack_from("<QQ", data, offset + 80)
            end = offset + FRAME_HEADER + color_bytes + depth_bytes
            chunks.append(data[offset:end])
            offset = end
        header = bytearray(data[:reader.frames_offset])
        struct.pack_into("<Q", header, reader.frames_offset - 8, frames)
        scene_id = sens_path.stem
        with open(tmp / "scans" / scene_id / sens_path.name, "wb") as f:
            f.write(header)
            for k in range(frames):
                f.write(chunks[k % len(chunks)])
        original = captions[scene_id]
        captions[scene_id] = {str(k): original[str(k % len(chunks))] for k in range(frames)
                              if str(k % len(chunks)) in original}
    (tmp / "captions.json").write_text(json.dumps(captions))
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


def reference_scene(raw: Path, scene_id: str, out: Path, frame_step: int, text_encoder: str) -> int:
    """One scene the reference way; returns the bytes written."""
    import torch
    from PIL import Image

    from preprocessing.captions import embed_captions
    from preprocessing.pipeline import _text_encoder
    from preprocessing.projection import default_margin, openscene_mapping
    from preprocessing.scannet.mesh import read_scannet_scene
    from preprocessing.scannet.sens import rescale_intrinsic

    W, H = 320, 240
    sd = SensorData(raw / "scans" / scene_id / f"{scene_id}.sens")
    mesh = read_scannet_scene(raw / "scans" / scene_id, raw / "scannetv2-labels.combined.tsv")
    K = rescale_intrinsic(sd.intrinsic_depth, (sd.depth_width, sd.depth_height), (W, H)).astype(np.float64)
    coords = mesh.xyz.astype(np.float64)
    captions = json.loads((raw / "captions.json").read_text())[scene_id]
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
    dense = torch.from_numpy(np.stack(mappings))  # [F, N, 3] int64
    clip = embed_captions(texts, _text_encoder(text_encoder))
    path = out / f"{scene_id}.pth"
    torch.save({"mapping": dense, "captions": texts, "clip": torch.from_numpy(clip),
                "color": torch.from_numpy(np.stack(colors))}, path)
    return path.stat().st_size


def run_reference(raw: Path, out: Path, frame_step: int, text_encoder: str) -> None:
    """Entry point of the reference subprocess (so its peak RSS is its own)."""
    from preprocessing.pipeline import _text_encoder

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _text_encoder(text_encoder)  # imports and model load: the reference's one-time set-up
    setup = time.perf_counter() - start
    scene_ids = sorted(p.name for p in (raw / "scans").iterdir() if p.is_dir())
    scene_seconds = []
    for sid in scene_ids:
        t = time.perf_counter()
        reference_scene(raw, sid, out, frame_step, text_encoder)
        scene_seconds.append(time.perf_counter() - t)
    print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "setup_s": setup, "scene_s": scene_seconds}))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--frames", type=int, default=1000, help="frames per .sens (>= 1000 for the target)")
    ap.add_argument("--frame-step", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--text-encoder", default="minilm")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmask3d-bench-preprocess"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_only:
        run_reference(args.reference_only, args.work / "reference", args.frame_step, args.text_encoder)
        return

    from dask.distributed import Client, LocalCluster

    from preprocessing.pipeline import PreprocessConfig, run_preprocess
    from storage.store import open_store

    args.work.mkdir(parents=True, exist_ok=True)
    raw = build_data(args.work, args.scenes, args.frames, args.seed)
    sens_bytes = sum(p.stat().st_size for p in raw.glob("scans/*/*.sens"))
    print(f"data: {args.scenes} scenes x {args.frames} frames, .sens total {sens_bytes / 1e9:.2f} GB, "
          f"frame step {args.frame_step}")
    for p in raw.glob("scans/*/*.sens"):  # warm the page cache for both runs alike
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass

    # ours: Dask LocalCluster. Cold: fresh worker processes (imports, text model load); warm: the
    # same workers again on a fresh store, as every scene after the first of a long run.
    # Worker peak RSS is read from the workers before they close.
    store = args.work / "store.zarr"
    cfg = PreprocessConfig(frame_step=args.frame_step, captions=raw / "captions.json",
                           text_encoder=args.text_encoder)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        timings = []
        for _ in ("cold", "warm"):
            shutil.rmtree(store, ignore_errors=True)
            t = time.perf_counter()
            summaries = run_preprocess("scannet", raw, store, cfg, dask_address=cluster.scheduler_address)
            timings.append(time.perf_counter() - t)
            assert all(s.status == "written" for s in summaries), summaries
        rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    ours, ours_warm = timings

    ref_out = args.work / "reference"
    shutil.rmtree(ref_out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--reference-only", str(raw), "--work", str(args.work),
                           "--frame-step", str(args.frame_step), "--text-encoder", args.text_encoder],
                          capture_output=True, text=True, check=True)
    ref = time.perf_counter() - t
    ref_stats = json.loads(proc.stdout.strip().splitlines()[-1])
    ref_rss, ref_scenes = ref_stats["max_rss_mb"], sum(ref_stats["scene_s"])

    opened = open_store(store)
    proj_bytes = dense_bytes = 0
    for sid in opened.scene_ids():
        scene = opened.scene(sid)
        proj_bytes += dir_bytes(scene.path / "proj")
        dense_bytes += scene.num_points * scene.num_frames * 8
    kept = sum(s.frames_kept for s in summaries)
    print(f"ours (run_preprocess, {args.workers} Dask workers): cold {ours:.1f} s, "
          f"warm workers {ours_warm:.1f} s ({kept} kept frames)")
    print(f"reference (SensorData + OpenScene + torch.save): all {ref:.1f} s, "
          f"scenes only (no imports / model load) {ref_scenes:.1f} s")
    print(f"speed ratio cold {ref / ours:.1f}x, warm {ref_scenes / ours_warm:.1f}x (target >= 10x)")
    print("peak RSS per worker: " + ", ".join(f"{v:.0f} MB" for v in rss.values())
          + f" (target <= 1536 MB); reference process {ref_rss:.0f} MB")
    print(f"store: proj {proj_bytes / 1e6:.2f} MB vs dense N x F int64 {dense_bytes / 1e6:.1f} MB "
          f"(1/{dense_bytes / max(proj_bytes, 1):.0f}, target <= 1/20); "
          f"whole store {dir_bytes(store) / 1e6:.1f} MB, "
          f"reference files {dir_bytes(ref_out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
