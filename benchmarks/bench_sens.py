"""Decode throughput of ``SensReader`` against a reader written like ScanNet's official SensorData.py.

Both decode every frame (step 1) of the same real-size synthetic scene (1296x968 JPEG colour,
640x480 zlib depth) to 320x240 colour + depth in metres, in the same run. The reference follows
SensorData.py: per-field ``struct.unpack`` of each frame, payloads joined from per-byte
``struct.unpack('c' * n)``, full-size JPEG decode, then a nearest-neighbour resize (the official
exporter uses ``cv2.resize(..., INTER_NEAREST)``; Pillow stands in for imageio/cv2 here). A second
baseline reads the payloads in one ``read`` each, so the gain from decoding alone is visible.

    .venv/bin/python benchmarks/bench_sens.py [--frames 100] [--sens PATH]
"""

from __future__ import annotations

import argparse
import io
import struct
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from preprocessing.scannet.sens import SensReader

SIZE = (320, 240)


def reference_frames(path: Path, size: tuple[int, int], per_byte: bool = True):
    """Yield (pose, color, depth) the way the official SensorData.py reads and exports frames."""
    with open(path, "rb") as f:
        version = struct.unpack("I", f.read(4))[0]
        assert version == 4
        strlen = struct.unpack("Q", f.read(8))[0]
        b"".join(struct.unpack("c" * strlen, f.read(strlen)))
        for _ in range(4):
            np.asarray(struct.unpack("f" * 16, f.read(16 * 4)), dtype=np.float32).reshape(4, 4)
        struct.unpack("i", f.read(4))
        struct.unpack("i", f.read(4))
        struct.unpack("I", f.read(4))
        struct.unpack("I", f.read(4))
        depth_width = struct.unpack("I", f.read(4))[0]
        depth_height = struct.unpack("I", f.read(4))[0]
        depth_shift = struct.unpack("f", f.read(4))[0]
        num_frames = struct.unpack("Q", f.read(8))[0]
        for _ in range(num_frames):
            pose = np.asarray(struct.unpack("f" * 16, f.read(16 * 4)), dtype=np.float32).reshape(4, 4)
            struct.unpack("Q", f.read(8))
            struct.unpack("Q", f.read(8))
            color_size = struct.unpack("Q", f.read(8))[0]
            depth_size = struct.unpack("Q", f.read(8))[0]
            if per_byte:
                color_data = b"".join(struct.unpack("c" * color_size, f.read(color_size)))
                depth_data = b"".join(struct.unpack("c" * depth_size, f.read(depth_size)))
            else:
                color_data, depth_data = f.read(color_size), f.read(depth_size)
            depth = np.frombuffer(zlib.decompress(depth_data), dtype=np.uint16)
            depth = depth.reshape(depth_height, depth_width)
            color = np.asarray(Image.open(io.BytesIO(color_data)).convert("RGB"))  # full-size decode
            color = np.asarray(Image.fromarray(color).resize(size, Image.Resampling.NEAREST))
            depth = np.asarray(Image.fromarray(depth).resize(size, Image.Resampling.NEAREST))
            yield pose, color, depth.astype(np.float32) / depth_shift


def ours(path: Path, size: tuple[int, int]):
    for frame in SensReader(path).frames(step=1, size=size):
        yield frame.pose, frame.color, frame.depth


def measure(frames, limit: int) -> tuple[float, int]:
    """(frames/s, frames decoded) over the first ``limit`` frames."""
    start = time.perf_counter()
    count = 0
    for _ in frames:
        count += 1
        if count >= limit:
            break
    return count / (time.perf_counter() - start), count


def peak_mib(frames, limit: int) -> float:
    """Peak Python heap (tracemalloc) while decoding ``limit`` frames: streaming keeps it flat."""
    tracemalloc.start()
    for _ in zip(range(limit), frames, strict=False):
        pass
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100, help="frames decoded per reader")
    parser.add_argument("--sens", type=Path, default=None, help="a .sens file (default: synthetic scene)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.sens
        if path is None:
            from preprocessing.synthetic import write_scannet

            (scene,) = write_scannet(Path(tmp), scenes=1, small=False)
            path = Path(tmp) / "scans" / scene / f"{scene}.sens"
        reader = SensReader(path)
        print(f"{path.name}: {reader.num_frames} frames, color {reader.color_width}x{reader.color_height}, "
              f"depth {reader.depth_width}x{reader.depth_height}, {path.stat().st_size / 2**20:.1f} MiB")
        # Same output check: depth identical, colour close (different resampling filters).
        a, b = next(ours(path, SIZE)), next(reference_frames(path, SIZE, per_byte=False))
        assert np.array_equal(a[0], b[0]) and np.allclose(a[2], b[2], atol=1e-3)
        list(zip(range(3), ours(path, SIZE), strict=False))  # warm the page cache
        fast, n = measure(ours(path, SIZE), args.frames)
        ref, n_ref = measure(reference_frames(path, SIZE), args.frames)
        bulk, n_bulk = measure(reference_frames(path, SIZE, per_byte=False), args.frames)
        print(f"SensReader                         : {fast:7.1f} frames/s ({n} frames)")
        print(f"reference (official SensorData.py) : {ref:7.1f} frames/s ({n_ref} frames)")
        print(f"reference with bulk payload reads  : {bulk:7.1f} frames/s ({n_bulk} frames)")
        print(f"ratio vs official-style reference  : {fast / ref:.1f}x (target >= 5x)")
        print(f"ratio vs bulk-read reference       : {fast / bulk:.1f}x")
        print(f"SensReader peak Python heap over {n} frames: {peak_mib(ours(path, SIZE), n):.1f} MiB "
              f"(file {path.stat().st_size / 2**20:.1f} MiB)")

if __name__ == "__main__":
    main()
