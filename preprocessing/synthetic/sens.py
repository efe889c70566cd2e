"""Writer for ScanNet `.sens` files (the official SensorData layout, version 4).

Layout (little endian), as `SensorData::saveToFile` in the ScanNet toolkit writes it:
header: uint32 version (4); uint64 sensor-name length + bytes; 4 x float32[16] row-major
(intrinsic_color, extrinsic_color, intrinsic_depth, extrinsic_depth); int32 color compression
(2 = JPEG); int32 depth compression (1 = zlib of uint16); uint32 color width, color height,
depth width, depth height; float32 depth shift; uint64 frame count. Each frame: float32[16]
camera_to_world; uint64 color timestamp, depth timestamp, color bytes, depth bytes; the payloads.
Then uint64 IMU count and that many records (rotation rate, acceleration, magnetic field,
attitude, gravity as 3 x float64 each, then uint64 timestamp).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

COLOR_JPEG = 2
DEPTH_ZLIB_USHORT = 1
IMU_DTYPE = np.dtype([("rotation_rate", "<f8", 3), ("acceleration", "<f8", 3), ("magnetic_field", "<f8", 3),
                      ("attitude", "<f8", 3), ("gravity", "<f8", 3), ("timestamp", "<u8")])  # 128 bytes


@dataclass(frozen=True)
class SensHeader:
    """The calibration and format fields of a `.sens` file."""

    intrinsic_color: np.ndarray  # 4x4
    intrinsic_depth: np.ndarray  # 4x4
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    extrinsic_color: np.ndarray = field(default_factory=lambda: np.eye(4))
    extrinsic_depth: np.ndarray = field(default_factory=lambda: np.eye(4))
    sensor_name: str = "StructureSensor"
    depth_shift: float = 1000.0
    color_compression: int = COLOR_JPEG
    depth_compression: int = DEPTH_ZLIB_USHORT


@dataclass(frozen=True)
class SensFrameBytes:
    """One encoded frame: pose, timestamps (microseconds) and compressed payloads."""

    camera_to_world: np.ndarray  # 4x4 (may hold -inf for a lost track, as in real scans)
    timestamp_color: int
    timestamp_depth: int
    color: bytes
    depth: bytes


def encode_color(rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a uint8 [H,W,3] image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_depth(depth_mm: np.ndarray, level: int = 1) -> bytes:
    """zlib bytes of a uint16 [H,W] depth image (millimetres with depth shift 1000)."""
    return zlib.compress(np.ascontiguousarray(depth_mm, dtype="<u2").tobytes(), level)


def _mat(m: np.ndarray) -> bytes:
    return np.asarray(m, dtype="<f4").reshape(16).tobytes()


def write_sens(path: Path, header: SensHeader, frames: Iterable[SensFrameBytes],
               imu: np.ndarray | None = None) -> int:
    """Stream `frames` into a `.sens` file at `path`; returns the number of frames written.

    The frame count is patched in after streaming, so `frames` may be a generator of unknown
    length. The file is written under a temporary name and renamed when complete.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    name = header.sensor_name.encode()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<IQ", 4, len(name)) + name)
        h = header
        for m in (h.intrinsic_color, h.extrinsic_color, h.intrinsic_depth, h.extrinsic_depth):
            f.write(_mat(m))
        f.write(struct.pack("<iiIIIIf", h.color_compression, h.depth_compression, h.color_width,
                            h.color_height, h.depth_width, h.depth_height, h.depth_shift))
        count_at = f.tell()
        f.write(struct.pack("<Q", 0))
        count = 0
        for frame in frames:
            f.write(_mat(frame.camera_to_world))
            f.write(struct.pack("<QQQQ", frame.timestamp_color, frame.timestamp_depth, len(frame.color),
                                len(frame.depth)))
            f.write(frame.color)
            f.write(frame.depth)
            count += 1
        records = np.zeros(0, IMU_DTYPE) if imu is None else np.asarray(imu, IMU_DTYPE)
        f.write(struct.pack("<Q", len(records)))
        f.write(records.tobytes())
        f.seek(count_at)
        f.write(struct.pack("<Q", count))
    os.replace(tmp, path)
    return count


def synthetic_imu(num: int, start_us: int, period_us: int, rng: np.random.Generator) -> np.ndarray:
    """Plausible IMU records: small rotation rates, gravity along -z, noisy magnetometer."""
    rec = np.zeros(num, IMU_DTYPE)
    rec["rotation_rate"] = rng.normal(0, 0.05, (num, 3))
    rec["acceleration"] = rng.normal(0, 0.02, (num, 3))
    rec["magnetic_field"] = np.array([20.0, -5.0, 40.0]) + rng.normal(0, 0.5, (num, 3))
    rec["attitude"] = np.cumsum(rng.normal(0, 0.002, (num, 3)), axis=0)
    rec["gravity"] = np.array([0.0, 0.0, -1.0]) + rng.normal(0, 0.01, (num, 3))
    rec["timestamp"] = start_us + period_us * np.arange(num, dtype=np.uint64)
    return rec
