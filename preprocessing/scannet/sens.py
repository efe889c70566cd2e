"""Streaming reader for ScanNet ``.sens`` RGB-D files (format: ScanNet SensReader/sensorData.h).

Layout (little endian)::

    header: uint32 version (= 4), uint64 strlen, char[strlen] sensor name,
            float32[4,4] intrinsic_color, extrinsic_color, intrinsic_depth, extrinsic_depth,
            int32 color compression (2 = jpeg), int32 depth compression (1 = zlib uint16),
            uint32 color width, color height, depth width, depth height,
            float32 depth shift (1000 = millimetres), uint64 frame count
    frame:  float32[4,4] camera_to_world, uint64 color timestamp, uint64 depth timestamp,
            uint64 color bytes, uint64 depth bytes, color payload, depth payload
    (IMU frames may follow the last RGB-D frame; they are not read)

Opening reads the header only. ``frames()`` reads each 96-byte frame header with one
``readinto`` and ``numpy.frombuffer``, seeks over the payload of frames it does not keep, decodes
JPEG colour straight to (close to) the target size with libjpeg DCT scaling (Pillow ``draft``)
and resizes only the remainder, and decodes depth zlib -> uint16 -> metres resized with nearest
neighbour. It never holds more than one frame in memory.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from storage.errors import InputError

VERSION = 4
COLOR_RAW, COLOR_PNG, COLOR_JPEG = 0, 1, 2
DEPTH_RAW, DEPTH_ZLIB = 0, 1
COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}

FRAME_HEADER = np.dtype([
    ("camera_to_world", "<f4", (4, 4)),
    ("timestamp_color", "<u8"),
    ("timestamp_depth", "<u8"),
    ("color_bytes", "<u8"),
    ("depth_bytes", "<u8"),
])
assert FRAME_HEADER.itemsize == 96
_MATRICES = struct.Struct("<64f")  # the four 4x4 calibration matrices
_TAIL = struct.Struct("<iiIIIIfQ")
_MAX_NAME = 4096
_MAX_SIDE = 1 << 14


@dataclass
class SensFrame:
    """One decoded RGB-D frame at the requested output size (W, H)."""

    index: int  # frame number in the file
    pose: np.ndarray  # float32 [4,4] camera_to_world
    color: np.ndarray  # uint8 [H,W,3]
    depth: np.ndarray  # float32 [H,W] metres, 0 = invalid


def rescale_intrinsic(intrinsic: np.ndarray, from_size: tuple[int, int],
                      to_size: tuple[int, int]) -> np.ndarray:
    """3x3 pinhole intrinsics for an image resized from ``from_size`` to ``to_size`` (W, H).

    Pixel centres are kept aligned: f' = f*s and c' = (c + 0.5)*s - 0.5 (ScanNet's 319.5 at 640
    wide becomes 159.5 at 320 wide).
    """
    k = np.asarray(intrinsic, dtype=np.float64)[:3, :3].copy()
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    k[0, 0] *= sx
    k[1, 1] *= sy
    k[0, 1] *= sx
    k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return k.astype(np.float32)


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel for a nearest-neighbour resize (pixel centres)."""
    return np.minimum(((np.arange(dst) + 0.5) * (src / dst)).astype(np.int64), src - 1)


class SensReader:
    """A ``.sens`` file: header attributes on open, frames on demand (see module docstring)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.dropped: dict[str, int] = {}
        try:
            self.file_size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                self._read_header(f)
        except OSError as error:
            raise InputError(f"{self.path}: cannot read ({error.strerror or error})") from error

    def __repr__(self) -> str:
        return (f"SensReader({str(self.path)!r}, frames={self.num_frames}, color={self.color_width}x"
                f"{self.color_height}, depth={self.depth_width}x{self.depth_height})")

    def _fail(self, message: str) -> InputError:
        return InputError(f"{self.path}: {message}")

    def _read_header(self, f: io.BufferedReader) -> None:
        head = f.read(12)
        if len(head) < 12:
            raise self._fail(f"not a .sens file: only {len(head)} bytes")
        self.version, name_len = struct.unpack("<IQ", head)
        if self.version != VERSION:
            raise self._fail(f"unsupported .sens version {self.version} (expected {VERSION})")
        if name_len > _MAX_NAME:
            raise self._fail(f"corrupt header: sensor name length {name_len}")
        rest = f.read(name_len + _MATRICES.size + _TAIL.size)
        if len(rest) < name_len + _MATRICES.size + _TAIL.size:
            raise self._fail(f"truncated header ({12 + len(rest)} bytes)")
        self.sensor_name = rest[:name_len].decode("utf-8", errors="replace")
        mats = np.frombuffer(rest, dtype="<f4", count=64, offset=name_len).reshape(4, 4, 4).astype(np.float32)
        self.intrinsic_color, self.extrinsic_color, self.intrinsic_depth, self.extrinsic_depth = mats
        (self.color_compression, self.depth_compression, self.color_width, self.color_height,
         self.depth_width, self.depth_height, self.depth_shift, self.num_frames) = _TAIL.unpack_from(
            rest, name_len + _MATRICES.size)
        self.frames_offset = 12 + len(rest)
        if self.color_compression not in (COLOR_RAW, COLOR_PNG, COLOR_JPEG):
            raise self._fail(f"unsupported color compression {self.color_compression} "
                             f"({COLOR_COMPRESSION.get(self.color_compression, '?')})")
        if self.depth_compression not in (DEPTH_RAW, DEPTH_ZLIB):
            raise self._fail(f"unsupported depth compression {self.depth_compression} "
                             f"({DEPTH_COMPRESSION.get(self.depth_compression, '?')})")
        sides = (self.color_width, self.color_height, self.depth_width, self.depth_height)
        if not all(0 < s <= _MAX_SIDE for s in sides):
            raise self._fail(f"corrupt header: image sizes {sides}")
        if not (math.isfinite(self.depth_shift) and self.depth_shift > 0):
            raise self._fail(f"corrupt header: depth shift {self.depth_shift}")
        if self.num_frames == 0:
            raise self._fail("the file holds zero frames")
        for name in ("intrinsic_color", "intrinsic_depth"):
            k = getattr(self, name)
            if not (np.isfinite(k).all() and k[0, 0] > 0 and k[1, 1] > 0):
                raise self._fail(f"corrupt header: {name} {k[:3, :3].tolist()}")

    def intrinsic(self, size: tuple[int, int] = (320, 240)) -> np.ndarray:
        """float32[3,3] depth intrinsics of this file, rescaled to an output image of ``size`` (W, H)."""
        return rescale_intrinsic(self.intrinsic_depth, (self.depth_width, self.depth_height), size)

    def frames(self, step: int = 20, size: tuple[int, int] = (320, 240),
               strict: bool = False) -> Iterator[SensFrame]:
        """Yield every ``step``-th frame (0, step, 2*step, ...) decoded at ``size`` (W, H).

        Frames with a non-finite pose are skipped; frames whose colour or depth payload does not
        decode are skipped (``InputError`` if ``strict``). Both are counted in ``self.dropped``
        (reset per call). A truncated file raises ``InputError`` naming the frame and byte offset
        after the frames before it were yielded.
        """
        if step < 1:
            raise InputError(f"frame step must be >= 1, got {step}")
        width, height = int(size[0]), int(size[1])
        if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
            raise InputError(f"invalid output size {size}")
        self.dropped = {}
        rows = nearest_indices(self.depth_height, height)[:, None]
        cols = nearest_indices(self.depth_width, width)[None, :]
        header = bytearray(FRAME_HEADER.itemsize)
        with open(self.path, "rb") as f:
            offset = self.frames_offset
            f.seek(offset)
            for index in range(self.num_frames):
                if f.readinto(header) != len(header):
                    raise self._fail(f"truncated at frame {index} (byte offset {offset}): file ends at byte "
                                     f"{self.file_size}, header announces {self.num_frames} frames")
                meta = np.frombuffer(header, dtype=FRAME_HEADER)[0]
                color_bytes, depth_bytes = int(meta["color_bytes"]), int(meta["depth_bytes"])
                end = offset + len(header) + color_bytes + depth_bytes
                if end > self.file_size:
                    raise self._fail(f"truncated at frame {index} (byte offset {offset}): payload of "
                                     f"{color_bytes + depth_bytes} bytes runs past the end of the file "
                                     f"(byte {self.file_size})")
                if index % step:
                    f.seek(end)
                    offset = end
                    continue
                pose = np.array(meta["camera_to_world"], dtype=np.float32)
                if not np.isfinite(pose).all():
                    self._drop("non_finite_pose")
                    f.seek(end)
                    offset = end
                    continue
                color_data = f.read(color_bytes)
                depth_data = f.read(depth_bytes)
                where = f"frame {index} (byte offset {offset})"
                color = self._decode_color(color_data, (width, height), where, strict)
                depth = self._decode_depth(depth_data, rows, cols, where, strict)
                offset = end
                if color is None or depth is None:
                    continue
                yield SensFrame(index=index, pose=pose, color=color, depth=depth)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _decode_color(self, data: bytes, size: tuple[int, int], where: str,
                      strict: bool) -> np.ndarray | None:
        expected = (self.color_width, self.color_height)
        if self.color_compression == COLOR_RAW:
            if len(data) != self.color_width * self.color_height * 3:
                raise self._fail(f"{where}: raw color has {len(data)} bytes, header size {expected} "
                                 f"needs {self.color_width * self.color_height * 3}")
            image = Image.frombuffer("RGB", expected, data, "raw", "RGB", 0, 1)
        else:
            try:
                image = Image.open(io.BytesIO(data))
                if image.size != expected:
                    raise self._fail(f"{where}: color image is {image.size[0]}x{image.size[1]}, "
                                     f"header says {expected[0]}x{expected[1]}")
                if self.color_compression == COLOR_JPEG:
                    image.draft("RGB", size)  # libjpeg DCT scaling: decode at >= size, 1/2..1/8
                image.load()
            except InputError:
                raise
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                if strict:
                    raise self._fail(f"{where}: corrupt color image ({error})") from error
                self._drop("corrupt_color")
                return None
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    def _decode_depth(self, data: bytes, rows: np.ndarray, cols: np.ndarray, where: str,
                      strict: bool) -> np.ndarray | None:
        expected = self.depth_width * self.depth_height * 2
        if self.depth_compression == DEPTH_ZLIB:
            try:
                data = zlib.decompress(data, bufsize=expected)
            except zlib.error as error:
                if strict:
                    raise self._fail(f"{where}: corrupt depth payload ({error})") from error
                self._drop("corrupt_depth")
                return None
        if len(data) != expected:
            raise self._fail(f"{where}: depth holds {len(data)} bytes, header size "
                             f"{self.depth_width}x{self.depth_height} needs {expected}")
        raw = np.frombuffer(data, dtype="<u2").reshape(self.depth_height, self.depth_width)
        return raw[rows, cols].astype(np.float32) / np.float32(self.depth_shift)
